"""Shared fixtures: tiny random causal LMs built from configs in code, and an offline tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128
)


def _configs():
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaConfig(**COMMON, intermediate_size=128, num_key_value_heads=2),
        "mistral": lambda: tf.MistralConfig(
            **COMMON, intermediate_size=128, num_key_value_heads=2, sliding_window=16
        ),
        "qwen2": lambda: tf.Qwen2Config(**COMMON, intermediate_size=128, num_key_value_heads=2),
        "qwen3": lambda: tf.Qwen3Config(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16),
        "gemma3": lambda: tf.Gemma3TextConfig(
            **COMMON,
            intermediate_size=128,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "phi3": lambda: tf.Phi3Config(
            **COMMON,
            intermediate_size=128,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2
        ),
        "opt": lambda: tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
            pad_token_id=1,
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**COMMON, intermediate_size=128),
    }


ARCHITECTURES = sorted(_configs())


def make_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised causal LM of the given architecture (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[arch](), dtype=dtype)
    return model.eval()


def make_tokenizer():
    """A character-level tokenizer built in code (no download) that puts BOS first, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def calibration_ids(n: int = 8, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder``."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def assert_same_model(expected, loaded) -> None:
    """Same state dict (keys, dtypes, values) and the same logits on a few calibration windows."""
    want, got = expected.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    ids = calibration_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(expected(ids).logits, loaded(ids).logits)
