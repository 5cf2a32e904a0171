"""Tiny random mixture-of-experts causal LMs built from configs in code (no Hub access).

Every family stores its routed experts as fused 3-D parameters (transformers 5). The models are float32,
seeded and in eval mode, and keep the experts implementation transformers picks for a model built from
a config (``grouped_mm``); call ``model.set_experts_implementation("eager")`` for the per-expert loop.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

VOCAB = 128
HIDDEN = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _configs():
    import transformers as tf

    return {
        "mixtral": lambda: tf.MixtralConfig(
            **COMMON, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=32, num_local_experts=4
        ),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            **COMMON,
            num_hidden_layers=2,
            num_key_value_heads=2,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=6,
        ),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            **COMMON,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            moe_intermediate_size=24,
            num_experts=8,
            norm_topk_prob=True,
        ),
        "olmoe": lambda: tf.OlmoeConfig(
            **COMMON, num_hidden_layers=2, num_key_value_heads=4, intermediate_size=32, num_experts=8
        ),
        # MLA attention: q through a rank-16 LoRA, kv through rank 16, head dim 8 (nope) + 8 (rope) for q/k
        # and 16 for v; layer 0 is a dense MLP (first_k_dense_replace=1), layers 1 and 2 are MoE blocks.
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **COMMON,
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=96,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=16,
        ),
        "gpt_oss": lambda: tf.GptOssConfig(
            **COMMON,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=32,
            num_local_experts=4,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            # YaRN like the real model, with a factor consistent with max_position_embeddings (no warning)
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 32,
                "rope_theta": 150000.0,
            },
        ),
    }


MOE_FAMILIES = list(_configs())


def make_moe_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random float32 causal LM of ``family`` (one of ``MOE_FAMILIES``), seeded, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = _configs()[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
