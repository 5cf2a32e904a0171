"""Compact folders through transformers' own loader: the format registered as a transformers quantization
method (docs/design.md, "On disk").

Importing this module registers ``quant_method: "maiht"`` with ``register_quantization_config`` /
``register_quantizer`` (``import optimum_maiht`` imports it as soon as transformers loads its models,
see ``optimum_maiht/__init__.py``). ``AutoModelForCausalLM.from_pretrained(folder)`` and
``pipeline(model=folder)`` then:

1. point transformers at our index (:meth:`MAIHTCompressedQuantizer.update_attn_implementation`, the hook
   that sees the config before the weight files are resolved);
2. check the index and every shard header against the model transformers built on ``meta``, and every
   bitmask against its values, before any weight is read (``compressed_loading.check_against_model``);
3. decompress each pruned weight from its parts as transformers reads them (:class:`Decompress`, one
   weight converter on the CPU), cast to the parameter's dtype; ``device_map`` and ``dtype`` are
   transformers' own;
4. leave a plain dense model: ``dequantize`` is always on, so transformers removes the quantization config
   and the quantizer from the model after loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .compressed import (
    COMPRESSED_INDEX_NAME,
    CORRUPTED_HINT,
    QUANT_METHOD,
    CompressedCheckpointError,
)
from .compressed_loading import CompressedIndex, check_against_model, decompress, read_index

_SUFFIXES = ("compressed", "bitmask", "row_offsets", "shape")


@register_quantization_config(QUANT_METHOD)
class MAIHTCompressedConfig(QuantizationConfigMixin):
    """``quantization_config`` of a compact folder: ``{"quant_method": "maiht"}`` and nothing else (how
    each weight is encoded is in the index). ``dequantize`` is a class constant: the loaded model is dense."""

    dequantize = True

    def __init__(self, quant_method: str = QUANT_METHOD, **unknown: Any):
        if quant_method != QUANT_METHOD or unknown:
            raise CompressedCheckpointError(
                f"config.json: quantization_config {{'quant_method': {quant_method!r}, ...}} with keys "
                f"{sorted(unknown)} is not one optimum-maiht writes ({{'quant_method': '{QUANT_METHOD}'}}); "
                f"{CORRUPTED_HINT}"
            )
        self.quant_method = QUANT_METHOD


@register_quantizer(QUANT_METHOD)
class MAIHTCompressedQuantizer(HfQuantizer):
    """Loads a compact folder into a dense model (see the module docstring for the steps)."""

    requires_calibration = False

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.pre_quantized = True  # the folder holds encoded weights even when the caller passed the config
        self.index: CompressedIndex | None = None

    def update_attn_implementation(self, config: Any) -> Any:
        """The weights are in our index, not in ``model.safetensors`` (and not in the marker, which names
        this package for installs without it)."""
        config.transformers_weights = COMPRESSED_INDEX_NAME
        return config

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        """Check the whole checkpoint against the model on ``meta`` before transformers reads a weight."""
        files = [Path(f) for f in kwargs.get("checkpoint_files") or []]
        folders = {f.parent for f in files}
        if len(folders) != 1:
            raise CompressedCheckpointError(
                f"compressed shards spread over {sorted(folders)}; {CORRUPTED_HINT}"
            )
        index = read_index(folders.pop())
        if set(files) != set(index.weight_map.values()):
            raise index.error("transformers resolved other shards than the index names")
        check_against_model(index, model)
        self.index = index
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if getattr(model.config, "transformers_weights", None) == COMPRESSED_INDEX_NAME:
            del model.config.transformers_weights
        return model

    def get_weight_conversions(self) -> list[WeightConverter]:
        """One converter: every ``P.compressed`` / ``P.bitmask`` / ``P.row_offsets`` / ``P.shape`` is
        collected under ``P`` and decompressed there, on the CPU (numpy unpacks the bits)."""
        sources = [rf"\.{suffix}$" for suffix in _SUFFIXES]
        return [WeightConverter(sources, "", [Decompress(self)], force_cpu=True)]

    def is_serializable(self) -> bool:
        return False  # never reached: the loaded model is plain and dense (``dequantize``)

    @property
    def is_trainable(self) -> bool:
        return True


class Decompress(ConversionOps):
    """transformers' conversion op of one pruned weight: its stored parts in, the dense parameter out."""

    def __init__(self, hf_quantizer: MAIHTCompressedQuantizer):
        self.hf_quantizer = hf_quantizer  # transformers then reads the parts in their stored dtypes

    def __deepcopy__(self, memo: dict) -> Decompress:
        return Decompress(self.hf_quantizer)  # transformers copies the converter per weight: share the index

    def convert(
        self,
        input_dict: dict[str, Any],
        source_patterns: list[str],
        target_patterns: list[str],
        full_layer_name: str = "",
        model: Any = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        index = self.hf_quantizer.index
        if index is None or full_layer_name not in index.layers:
            raise CompressedCheckpointError(
                f"{full_layer_name}: not a pruned weight of the index; {CORRUPTED_HINT}"
            )
        parts = {}
        for pattern, tensors in input_dict.items():
            parts[pattern.removeprefix(r"\.").removesuffix("$")] = (
                tensors[0] if isinstance(tensors, list) else tensors
            )
        param = model.get_parameter(full_layer_name)
        weight = decompress(full_layer_name, index.layers[full_layer_name], parts, tuple(param.shape))
        return {full_layer_name: weight.to(param.dtype)}
