"""`MAIHTModelForCausalLM`: load a model saved by optimum-maiht, dense or compressed, as a regular
transformers model (dense tensors in memory). Since the compact format is registered with transformers
(:mod:`optimum_maiht.quantizer`), this is ``AutoModelForCausalLM.from_pretrained`` plus three things: a
compact folder's ``config.json`` and index are checked with bounded readers before transformers parses
them, folders written before the registration (no ``quantization_config``) load too, and
``sparse_kernels=True``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .compressed import QUANT_METHOD
from .compressed_loading import is_compressed_config, read_index
from .files import read_json
from .kernels import enable_2of4_kernels
from .model_utils import looks_like_local_path
from .quantizer import MAIHTCompressedConfig

logger = logging.getLogger(__name__)

_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")
_UNSUPPORTED_KWARGS = ("gguf_file", "quantization_config", "state_dict", "subfolder")


class MAIHTModelForCausalLM:
    """Loader for pruned causal LMs: ``from_pretrained`` returns a plain ``transformers`` model.

    >>> model = MAIHTModelForCausalLM.from_pretrained("smollm2-maiht-2of4")            # dense or compressed
    >>> model = MAIHTModelForCausalLM.from_pretrained("user/repo", dtype=torch.float16, device_map="cuda",
    ...                                               sparse_kernels=True)            # 2:4 kernels on the GPU
    """

    def __init__(self) -> None:
        raise TypeError("MAIHTModelForCausalLM is a loader: use MAIHTModelForCausalLM.from_pretrained(...)")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, sparse_kernels: bool = False, **kwargs: Any
    ) -> Any:
        """Load a local folder or a Hub repo id in either format with ``AutoModelForCausalLM``.

        A compressed folder is checked against its model and decompressed exactly by transformers' loader
        through our quantizer, so ``dtype`` (default: the checkpoint's), ``device_map``,
        ``attn_implementation`` and the other loading options work as usual. ``sparse_kernels=True`` then
        calls :func:`optimum_maiht.enable_2of4_kernels` (2:4 layers on CUDA, compute capability >= 8.0,
        float16 / bfloat16); where it cannot, the reasons are logged.
        """
        from transformers import AutoModelForCausalLM

        source = str(pretrained_model_name_or_path)
        path = Path(source).expanduser()
        if path.is_dir():
            config = _local_config(path)
        elif path.exists() or looks_like_local_path(source):
            raise FileNotFoundError(
                f"{path} is not a model folder; give a folder with config.json or a Hub repo id"
            )
        else:
            config = _hub_config(source, kwargs)
        if config is not None and is_compressed_config(config):
            _refuse_unsupported_kwargs(kwargs)
            if path.is_dir():
                read_index(path)  # bounded and checked before transformers parses it
            if (config.get("quantization_config") or {}).get("quant_method") != QUANT_METHOD:
                kwargs["quantization_config"] = MAIHTCompressedConfig()  # written by an older release
        loaded = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else source, **kwargs)
        if sparse_kernels:  # (with output_loading_info=True, ``loaded`` is (model, info))
            enable_2of4_kernels(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded


def _local_config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` read with a bounded reader (``None`` when absent: transformers says
    so in its own words)."""
    path = folder / "config.json"
    return read_json(path, what="config.json") if path.is_file() else None


def _hub_config(repo_id: str, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """A Hub repo's ``config.json``, downloaded with the caller's Hub options, to tell a compact repo."""
    from huggingface_hub import hf_hub_download

    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    return read_json(hf_hub_download(repo_id, "config.json", **hub_kwargs), what="config.json")


def _refuse_unsupported_kwargs(kwargs: dict[str, Any]) -> None:
    """Options that name other weights or another format than the compressed shards of the folder."""
    unsupported = sorted(k for k in _UNSUPPORTED_KWARGS if k in kwargs)
    if unsupported:
        raise ValueError(
            f"{unsupported} cannot be used with an optimum-maiht compressed checkpoint (its weights are "
            "the folder's compressed shards, decompressed in memory); drop them"
        )
