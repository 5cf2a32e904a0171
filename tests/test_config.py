"""MAIHTConfig: validation with errors that name the field, and JSON round trips."""

from __future__ import annotations

import json
import time
from dataclasses import fields

import pytest

from optimum_maiht import MAIHTConfig
from optimum_maiht.configuration import _CHOICES, _INTEGERS, _REGEX_LISTS, CONFIG_NAME


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"sparsity": 0.0}, "sparsity"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.2}, "sparsity"),
        ({"sparsity": "0.5"}, "sparsity"),
        ({"sparsity": True}, "sparsity"),
        ({"pattern": "3:2"}, "pattern"),
        ({"pattern": "2-4"}, "pattern"),
        ({"pattern": "0:4"}, "pattern"),
        ({"pattern": "4:4"}, "pattern"),
        ({"pattern": "structured"}, "pattern"),
        ({"pattern": "2:4", "sparsity": 0.6}, "sparsity"),
        ({"scope": "column"}, "scope"),
        ({"formulation": "lasso"}, "formulation"),
        ({"formulation": "penalty", "pattern": "2:4"}, "penalty"),
        ({"iterations": -1}, "iterations"),
        ({"refit_iterations": 2.5}, "refit_iterations"),
        ({"ridge": -0.1}, "ridge"),
        ({"ridge": float("nan")}, "ridge"),
        ({"ridge": True}, "ridge"),
        ({"num_samples": 0}, "num_samples"),
        ({"sequence_length": 1}, "sequence_length"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"batch_size": None}, "batch_size"),
        ({"targets": ["(unclosed"]}, "targets"),
        ({"targets": []}, "targets"),
        ({"ignore": [3]}, "ignore"),
    ],
)
def test_bad_fields_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MAIHTConfig(**kwargs)


def test_table_driven_messages():
    with pytest.raises(ValueError, match=r"^scope must be 'row' or 'layer', got 'column'$"):
        MAIHTConfig(scope="column")
    with pytest.raises(ValueError, match=r"^formulation must be 'constraint' or 'penalty', got 'lasso'$"):
        MAIHTConfig(formulation="lasso")
    with pytest.raises(ValueError, match=r"^sequence_length must be an integer from 2 to 1,048,576, got 1$"):
        MAIHTConfig(sequence_length=1)


def test_every_int_and_choice_field_is_validated():
    """A new int (or int | None) field needs its line in the integer table, else nothing checks it."""
    by_type = {f.name: f.type for f in fields(MAIHTConfig)}
    assert {name for name, t in by_type.items() if t in ("int", "int | None")} == set(_INTEGERS)
    for name, (_, _, none_allowed) in _INTEGERS.items():
        assert none_allowed == by_type[name].endswith("| None"), name
    assert set(_CHOICES) | set(_REGEX_LISTS) <= set(by_type)
    for name, allowed in _CHOICES.items():
        for choice in allowed:
            assert getattr(MAIHTConfig(**{name: choice}), name) == choice


def test_defaults_and_implied_sparsity():
    assert MAIHTConfig().sparsity == 0.5
    assert MAIHTConfig(pattern="2:4").sparsity == 0.5
    assert MAIHTConfig(pattern="1:4").sparsity == 0.75
    assert MAIHTConfig(pattern="4:8").nm == (4, 8)
    assert MAIHTConfig(pattern="unstructured", sparsity=0.7).nm is None
    assert MAIHTConfig(targets="q_proj").targets == ["q_proj"]


def test_dict_and_file_round_trip(tmp_path):
    config = MAIHTConfig(sparsity=0.6, scope="layer", iterations=7, targets=["mlp"], ignore=["down"], seed=3)
    assert MAIHTConfig.from_dict(config.to_dict()) == config
    path = config.save_pretrained(tmp_path / "out")
    assert path.name == CONFIG_NAME
    assert json.loads(path.read_text())["sparsity"] == 0.6
    assert MAIHTConfig.from_pretrained(tmp_path / "out") == config
    assert MAIHTConfig.from_pretrained(path) == config


def test_from_dict_rejects_unknown_fields_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="unknown MAIHTConfig field"):
        MAIHTConfig.from_dict({"sparsity": 0.5, "blocksize": 128})
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        MAIHTConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MAIHTConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "field, value, limit",
    [
        ("iterations", 10**12, "10,000"),
        ("refit_iterations", 10_001, "10,000"),
        ("num_samples", 10**7, "1,000,000"),
        ("sequence_length", 2**21, "1,048,576"),
        ("seed", 10**30, "4,294,967,295"),
        ("reconstruction_epochs", 10**6, "1,000"),
    ],
)
def test_integers_have_upper_bounds_naming_field_and_limit(field, value, limit):
    with pytest.raises(ValueError, match=rf"^{field} must be an integer from \d+ to {limit}, got "):
        MAIHTConfig(**{field: value})


def test_huge_and_float_seeds_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^seed must be an integer .*got an integer of 100001 bits$"):
        MAIHTConfig(seed=2**100000)
    with pytest.raises(ValueError, match=r"^seed must be an integer .*got 1e\+30$"):
        MAIHTConfig(seed=1e30)
    with pytest.raises(ValueError, match=r"^ridge must be a number from 0 to 1e\+06"):
        MAIHTConfig(ridge=1e300)
    with pytest.raises(ValueError, match=r"^ridge must be a number from 0 to 1e\+06, got inf$"):
        MAIHTConfig(ridge=float("inf"))


@pytest.mark.parametrize(
    "given, stored", [("2:4\n", "2:4"), (" 4:8 ", "4:8"), ("02:04", "2:4"), ("Unstructured", "unstructured")]
)
def test_patterns_are_normalised(given, stored):
    """ "2:4\n" used to prune 2:4 while the card read the pattern as unstructured."""
    config = MAIHTConfig(pattern=given)
    assert config.pattern == stored
    assert MAIHTConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("pattern", ["２:４", "2:4:8", "2 : 4", "1:2048", True])
def test_other_patterns_are_refused(pattern):
    with pytest.raises(ValueError, match=r"^pattern must be 'unstructured' or 'N:M' with 0 < N < M <= 1024"):
        MAIHTConfig(pattern=pattern)


@pytest.mark.parametrize("field", ["targets", "ignore"])
@pytest.mark.parametrize("pattern", ["(?:.|..)*(?<=Z)", r"^(?:[\w.]|[\w.][\w.])+(?=x)"])
def test_a_catastrophic_pattern_is_refused_within_seconds(field, pattern):
    """These backtrack exponentially on any module name (``re`` also on the issue's ``(.|.)*Z``, which the
    ``regex`` engine matches at once); the time limit stops them when the config is built (probe names),
    before any model is loaded."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"^{field} pattern .* takes more than 0.1 s to match"):
        MAIHTConfig(**{field: [pattern]}, **({"targets": [".*"]} if field == "ignore" else {}))
    assert time.perf_counter() - start < 5


def test_the_match_itself_is_time_limited():
    """A pattern that passes the probes but explodes on one real module name still ends within seconds."""
    from optimum_maiht.targets import matching

    config = MAIHTConfig(targets=["^(x|xx)+$"])  # fast on the probe names
    start = time.perf_counter()
    with pytest.raises(
        ValueError, match=r"^targets pattern .* takes more than 0.1 s to match the module name"
    ):
        matching(config.targets, "x" * 60 + "y")
    assert time.perf_counter() - start < 5


def test_pattern_lists_are_bounded():
    with pytest.raises(ValueError, match=r"the limits are 256 patterns of 1000 characters"):
        MAIHTConfig(targets=["q_proj"] * 257)
    with pytest.raises(ValueError, match=r"the limits are 256 patterns of 1000 characters"):
        MAIHTConfig(ignore=["x" * 1001])


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", r"maiht_config.json holds a JSON array at the top level, expected a JSON object"),
        ("[" * 100_000 + "]" * 100_000, r"nests JSON too deeply"),
        ('{"iterations": 1' + "0" * 5000 + "}", r"is not valid JSON \(Exceeds the limit"),
        (
            '{"iterations": 1000000000000}',
            r"maiht_config.json: iterations must be an integer from 0 to 10,000",
        ),
    ],
)
def test_hostile_config_files_get_one_line_errors(tmp_path, text, message):
    (tmp_path / CONFIG_NAME).write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        MAIHTConfig.from_pretrained(tmp_path)
    assert "\n" not in str(caught.value)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / CONFIG_NAME).write_bytes(b'{"seed": "\xff"}')
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: maiht_config.json is not UTF-8 text \(byte 0xff"):
        MAIHTConfig.from_pretrained(tmp_path)
