"""Calibration / evaluation data: every accepted input kind, the tokenizer's BOS, seeded windows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer

from optimum_maiht.data import (
    bundled_text,
    calibration_text,
    prepare_calibration,
    special_prefix,
    token_windows,
)

TEXT = "".join(f"Sentence number {i} is about pruning language models. " for i in range(80))


def test_every_window_starts_with_the_tokenizers_bos():
    tok = make_tokenizer()
    assert special_prefix(tok) == [tok.bos_token_id]
    windows = prepare_calibration([TEXT], tok, num_samples=6, sequence_length=40, seed=0)
    assert windows.shape == (6, 40)
    assert (windows[:, 0] == tok.bos_token_id).all()
    assert (windows[:, 1:] != tok.bos_token_id).all()


def test_windows_are_seeded_distinct_and_exhaustive_when_unseeded():
    tokens = torch.arange(1000)
    a = token_windows(tokens, 5, 100, seed=1)
    assert torch.equal(a, token_windows(tokens, 5, 100, seed=1))
    assert not torch.equal(a, token_windows(tokens, 5, 100, seed=2))
    assert len({int(r[0]) for r in a}) == 5 and all(int(r[0]) % 100 == 0 for r in a), "non-overlapping chunks"
    assert torch.equal(token_windows(tokens, None, 100), tokens.view(10, 100))
    with pytest.raises(ValueError, match="enough for 10 windows of 100, but 11"):
        token_windows(tokens, 11, 100, seed=0)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "list", "dataset-text"])
def test_text_inputs_of_every_kind_give_the_same_windows(kind, tmp_path):
    from datasets import Dataset

    parts = [TEXT[:2000], TEXT[2000:]]
    joined = "\n\n".join(parts)
    if kind == "txt":
        (tmp_path / "c.txt").write_text(joined)
        data = tmp_path / "c.txt"
    elif kind == "jsonl":
        (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in parts))
        data = str(tmp_path / "c.jsonl")
    elif kind == "parquet":
        Dataset.from_dict({"text": parts}).to_parquet(str(tmp_path / "c.parquet"))
        data = tmp_path / "c.parquet"
    elif kind == "list":
        data = parts
    else:
        data = Dataset.from_dict({"text": parts})
    assert calibration_text(data) == joined
    tok = make_tokenizer()
    windows = prepare_calibration(data, tok, 4, 64, seed=0)
    assert torch.equal(windows, prepare_calibration(parts, tok, 4, 64, seed=0))


def test_token_id_inputs():
    from datasets import Dataset

    ids = torch.randint(3, 100, (5, 16))
    assert torch.equal(prepare_calibration(ids, None, 128, 2048, seed=0), ids), "a 2-D tensor is used as is"
    rows = Dataset.from_dict({"input_ids": ids.tolist()})
    assert torch.equal(prepare_calibration(rows, None, 128, 2048, seed=0), ids)
    ragged = Dataset.from_dict({"input_ids": [list(range(3, 40)), list(range(3, 30))]})
    assert prepare_calibration(ragged, None, 4, 16, seed=0).shape == (4, 16)


def test_bad_inputs(tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="'text' or 'input_ids'"):
        calibration_text(Dataset.from_dict({"content": ["x"]}))
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no string field 'text'"):
        calibration_text(tmp_path / "bad.jsonl")
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="unsupported calibration file type"):
        calibration_text(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        prepare_calibration([TEXT], None, 2, 16, seed=0)
    with pytest.raises(FileNotFoundError, match=r"pass it in a list: \[text\]"):
        calibration_text(TEXT)  # a whole text is not a path, even one too long for the file system
    with pytest.raises(ValueError, match="unknown bundled text"):
        bundled_text("c4")


def test_bundled_wikitext_excerpts():
    validation, test = bundled_text("wikitext2"), bundled_text("wikitext2-test")
    assert validation.lstrip().startswith("= Homarus gammarus =")
    assert test.lstrip().startswith("= Robert Boulter =")
    assert len(validation) > 250_000 and len(test) > 250_000
