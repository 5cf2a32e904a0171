"""`MAIHTModelForCausalLM`: load a model saved by optimum-maiht, dense or compressed, as a regular
transformers model (dense tensors in memory)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .compressed import (
    COMPRESSED_WEIGHTS_PATTERN,
    CompressedCheckpointError,
    is_compressed_config,
    is_compressed_folder,
    load_compressed_state_dict,
)
from .model_utils import looks_like_local_path

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
        """Load a local folder or a Hub repo id in either format.

        A dense folder goes straight to ``AutoModelForCausalLM.from_pretrained``. A compressed one is
        decompressed (exactly) and handed to transformers as a state dict, so ``dtype`` (default: the
        checkpoint's), ``device_map``, ``attn_implementation`` and the other loading options work as usual.
        ``sparse_kernels=True`` then calls :func:`optimum_maiht.enable_2of4_kernels` (2:4 layers on CUDA,
        compute capability >= 8.0, float16 / bfloat16); where it cannot, the reasons are logged.
        """
        from transformers import AutoModelForCausalLM

        source = str(pretrained_model_name_or_path)
        path = Path(source).expanduser()
        if path.is_dir():
            folder: Path | None = path if is_compressed_folder(path) else None
        elif path.exists() or looks_like_local_path(source):
            raise FileNotFoundError(
                f"{path} is not a model folder; give a folder with config.json or a Hub repo id"
            )
        else:
            folder = _download_if_compressed(source, kwargs)
        if folder is None:
            loaded = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else source, **kwargs)
        else:
            loaded = _load_compressed(folder, source, kwargs)
        if sparse_kernels:  # (with output_loading_info=True, ``loaded`` is (model, info))
            from .kernels import enable_2of4_kernels

            enable_2of4_kernels(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded


def _download_if_compressed(repo_id: str, kwargs: dict[str, Any]) -> Path | None:
    """For a Hub id: the local snapshot of a compressed repo, or ``None`` (dense: transformers loads it).

    The Hub keyword arguments (``revision``, ``token``, ...) are used here and removed from ``kwargs``
    only for a compressed repo.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config = json.loads(Path(hf_hub_download(repo_id, "config.json", **hub_kwargs)).read_text())
    if not is_compressed_config(config):
        return None
    for key in hub_kwargs:
        del kwargs[key]
    patterns = ["*.json", COMPRESSED_WEIGHTS_PATTERN.format(suffix="*")]
    return Path(snapshot_download(repo_id, allow_patterns=patterns, **hub_kwargs))


def _load_compressed(folder: Path, source: str, kwargs: dict[str, Any]) -> Any:
    """Build the model of a local compressed folder: its config, its causal-LM class and the decompressed
    state dict, handed to transformers with the caller's remaining options (``dtype``, ``device_map``,
    ...). ``source`` (what the caller asked for) becomes ``config.name_or_path``."""
    _refuse_unsupported_kwargs(kwargs)
    for key in _HUB_KWARGS:  # a local folder needs no download options
        kwargs.pop(key, None)
    want_info = kwargs.pop("output_loading_info", False)
    config = _compressed_config(folder, trust_remote_code=kwargs.pop("trust_remote_code", None))
    model_class = _causal_lm_class(folder, config)
    state_dict = load_compressed_state_dict(folder)
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state_dict, output_loading_info=True, **kwargs
    )
    _check_loading_info(folder, info)
    model.config.name_or_path = source
    logger.info("loaded the compressed checkpoint %s", source)
    return (model, info) if want_info else model


def _refuse_unsupported_kwargs(kwargs: dict[str, Any]) -> None:
    """Options that name other weights or another layout than the compressed shards of the folder."""
    unsupported = sorted(k for k in _UNSUPPORTED_KWARGS if k in kwargs)
    if unsupported:
        raise ValueError(
            f"{unsupported} cannot be used with an optimum-maiht compressed checkpoint (its weights are "
            "the folder's compressed shards, decompressed in memory); drop them"
        )


def _compressed_config(folder: Path, trust_remote_code: bool | None) -> Any:
    """The folder's config without the ``transformers_weights`` marker (it only stops plain transformers,
    it names no real file)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if "transformers_weights" in config:
        delattr(config, "transformers_weights")
    return config


def _causal_lm_class(folder: Path, config: Any) -> type:
    """transformers' causal-LM class for the config's model type (custom code is not supported)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise ValueError(
            f"{folder}: model_type {config.model_type!r} has no causal LM class in transformers "
            "(custom-code models are not supported in the compressed format)"
        )
    return model_class


def _check_loading_info(folder: Path, info: dict[str, Any]) -> None:
    """Every weight of the model came from the checkpoint and every stored one was used, shapes matching."""
    problems = {
        key: sorted(info[key])[:5]
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if info[key]
    }
    if problems:
        raise CompressedCheckpointError(
            f"{folder} does not match its config ({problems}); the checkpoint is corrupted or was saved "
            "from another model: save it again"
        )
