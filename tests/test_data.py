"""Calibration / evaluation data: every accepted input kind, the tokenizer's BOS, seeded windows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer

from optimum_maiht import data
from optimum_maiht.data import (
    bundled_text,
    calibration_text,
    prepare_calibration,
    special_prefix,
    token_windows,
    tokenize,
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


# -- files from elsewhere: read only as far as needed, errors that name the file and the line --------------


def test_a_file_under_the_budget_gives_the_windows_of_the_whole_text(tmp_path):
    """Identical to tokenizing the whole file, as before the reading limit existed."""
    tok = make_tokenizer()
    text = "\n".join(TEXT[i : i + 300] for i in range(0, len(TEXT), 300))
    (tmp_path / "c.txt").write_text(text)
    whole = token_windows(tokenize(tok, text), 5, 64, special_prefix(tok), seed=3)
    assert torch.equal(prepare_calibration(tmp_path / "c.txt", tok, 5, 64, seed=3), whole)


def test_calibration_stops_reading_once_it_has_enough(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(data, "MIN_CALIBRATION_CHARS", 0)
    monkeypatch.setattr(data, "CHARS_PER_WINDOW_TOKEN", 8)
    lines = [f"line {i:04d} " + "x" * 89 + "\n" for i in range(1000)]  # 100 characters each
    (tmp_path / "big.txt").write_text("".join(lines))
    with caplog.at_level("WARNING", logger="optimum_maiht.data"):
        windows = prepare_calibration(tmp_path / "big.txt", make_tokenizer(), 4, 32, seed=0)
    assert windows.shape == (4, 32)
    assert any("big.txt: read up to line 11 (1100 characters" in r.getMessage() for r in caplog.records)
    assert data.read_text_file(tmp_path / "big.txt", max_chars=1024) == "".join(lines[:11])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("long.txt", "short\n" + "y" * 101 + "\nshort\n", r"long.txt, line 2: longer than 100 characters"),
        (
            "long.jsonl",
            '{"text": "a"}\n{"text": "' + "y" * 101 + '"}\n',
            r"long.jsonl, line 2: longer than 100",
        ),
        (
            "bad.jsonl",
            '{"text": "a"}\n\n{"text": "b" "c"}\n',
            r"bad.jsonl, line 3 is not valid JSON \(Expecting ','",
        ),
        (
            "deep.jsonl",
            '{"text": "a"}\n' + "[" * 50 + "]" * 50 + "\n",
            r"deep.jsonl, line 2: no string field",
        ),
        ("list.jsonl", '{"text": "a"}\n[1]\n', r"list.jsonl, line 2: no string field 'text'"),
        ("latin.txt", b"fine\ncaf\xe9\n", r"latin.txt, line 2: not UTF-8 text \(byte 0xe9\)"),
        ("latin.jsonl", b'{"text": "caf\xe9"}\n', r"latin.jsonl, line 1: not UTF-8 text \(byte 0xe9\)"),
        ("null.parquet", {"text": ["a", None]}, r"null.parquet, row 1: the 'text' cell is empty \(null\)"),
        ("ints.parquet", {"text": [1, 2]}, r"ints.parquet: the 'text' column holds int64, not strings"),
        ("long.parquet", {"text": ["a", "y" * 101]}, r"long.parquet, row 1: a text longer than 100"),
        ("fake.parquet", b"not parquet", r"fake.parquet cannot be read as parquet"),
    ],
)
def test_bad_files_are_one_line_errors_naming_file_and_line(tmp_path, monkeypatch, name, content, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(data, "MAX_LINE_CHARS", 100)
    path = tmp_path / name
    if isinstance(content, dict):
        pq.write_table(pa.table(content), path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        prepare_calibration(path, make_tokenizer(), 2, 16, seed=0)
    assert "\n" not in str(caught.value)


def test_deeply_nested_jsonl_is_a_one_line_error(tmp_path):
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"deep.jsonl, line 1 nests JSON too deeply"):
        calibration_text(tmp_path / "deep.jsonl")


def test_parquet_is_read_without_datasets_or_its_cache(tmp_path, monkeypatch):
    """``datasets.load_dataset`` left an Arrow copy of every parquet file in its cache."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("datasets cache used"))
    datasets.Dataset.from_dict({"text": ["one", "two"]}).to_parquet(str(tmp_path / "c.parquet"))
    assert calibration_text(tmp_path / "c.parquet") == "one\n\ntwo"


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_200_mb_line_is_refused_within_bounded_memory(tmp_path, suffix):
    """The issue's 200 MB line was tokenized whole (10.7 GB). Generated here, never committed: it is
    refused after reading MAX_LINE_CHARS of it, with Python allocations under 64 MB."""
    import time
    import tracemalloc

    path = tmp_path / f"huge{suffix}"
    with path.open("w") as f:
        f.write('{"text": "a"}\n' if suffix == ".jsonl" else "a\n")
        f.write('{"text": "' if suffix == ".jsonl" else "")
        for _ in range(200):
            f.write("word " * 200_000)  # 1 MB
        f.write('"}\n' if suffix == ".jsonl" else "\n")
    assert path.stat().st_size > 200 * 10**6
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=rf"huge{suffix}, line 2: longer than 4,000,000 characters"):
            prepare_calibration(path, make_tokenizer(), 8, 64, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert time.perf_counter() - start < 30
