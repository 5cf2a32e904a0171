"""Names shared by several modules: the files a pruned folder holds, the storage formats, the bundled texts.

Standard library only: the CLI reads these at ``optimum-cli`` start-up.
"""

from __future__ import annotations

CONFIG_NAME = "maiht_config.json"
"""The :class:`~optimum_maiht.MAIHTConfig` of a run, in the saved folder."""
REPORT_NAME = "maiht_report.json"
"""The pruning report (:class:`~optimum_maiht.report.PruneReport`), in the saved folder."""
CARD_NAME = "README.md"
"""The model card, in the saved folder (the Hub shows it)."""
CONFIG_ANNOTATION_KEY = "maiht"
"""Key added to ``config.json``: transformers keeps unknown keys as config attributes and ignores them."""

SAVE_FORMATS = ("dense", "compressed")
"""``dense``: transformers safetensors with exact zeros; ``compressed``: kept values plus packed masks."""

BUNDLED_TEXTS = {
    "wikitext2-validation": "wikitext2_validation_excerpt.txt.gz",
    "wikitext2-test": "wikitext2_test_excerpt.txt.gz",
}
"""Texts shipped in ``optimum_maiht/texts`` (WikiText-2 excerpts, CC BY-SA 3.0)."""
BUNDLED_ALIASES = {"wikitext2": "wikitext2-validation"}
"""Short names accepted everywhere (API and CLI) for a bundled text."""
DEFAULT_CALIBRATION_TEXT = "wikitext2-validation"
"""Calibrate on validation text ..."""
DEFAULT_EVAL_TEXT = "wikitext2-test"
"""... and measure perplexity on test text."""

SOLVER_NAMES = ("maiht", "sparsegpt", "wanda", "magnitude")
"""The layer solvers ``MAIHTConfig(solver=...)`` names (``optimum_maiht.solvers``): mAIHT (the default),
and the baselines users compare it with, on the same calibration in the same pipeline."""
START_NAMES = ("wanda", "sparsegpt")
"""Where mAIHT starts each layer (``MAIHTConfig(start=...)``): Wanda's mask (the paper's start) or
SparseGPT's masks and weights (from which the monotone iteration can only lower the layer error)."""
START_DISPLAY_NAMES = {"wanda": "Wanda's mask", "sparsegpt": "SparseGPT's solution"}
SOLVER_DISPLAY_NAMES = {
    "maiht": "mAIHT",
    "sparsegpt": "SparseGPT",
    "wanda": "Wanda",
    "magnitude": "magnitude",
}
"""How the report, the card and the CLI name each solver."""
