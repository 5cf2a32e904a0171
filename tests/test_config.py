"""MAIHTConfig: validation with errors that name the field, and JSON round trips."""

from __future__ import annotations

import json
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
    with pytest.raises(ValueError, match=r"^sequence_length must be an integer >= 2, got 1$"):
        MAIHTConfig(sequence_length=1)


def test_every_int_and_choice_field_is_validated():
    """A new int (or int | None) field needs its line in the integer table, else nothing checks it."""
    by_type = {f.name: f.type for f in fields(MAIHTConfig)}
    assert {name for name, t in by_type.items() if t in ("int", "int | None")} == set(_INTEGERS)
    for name, (_, none_allowed) in _INTEGERS.items():
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
