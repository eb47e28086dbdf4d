"""params.yaml schema: unknown keys and out-of-range values are named errors."""

from __future__ import annotations

import pytest

from budgetalloc.errors import ParamsError
from budgetalloc.params import Params, load_params, params_to_dict, with_overrides


def test_defaults_roundtrip(tmp_path):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_to_dict(Params())))
    assert load_params(path) == Params()


@pytest.mark.parametrize(
    "text,message",
    [
        ("cluster:\n  kk: 3\n", "unknown key 'cluster.kk'"),
        ("cluster:\n  k: 1\n", "invalid value for 'cluster.k' \\(1\\)"),
        ("program:\n  alpha: 1.0\n", "'program.alpha'"),
        ("allocate:\n  batch_size: 0\n", "'allocate.batch_size'"),
        ("seed: -1\n", "'seed'"),
        ("[1, 2]\n", "expected a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_params(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_are_validated():
    p = with_overrides(Params(), {"cluster.k": 8, "seed": None})
    assert p.cluster.k == 8 and p.seed == 0
    with pytest.raises(ParamsError, match="cluster.k"):
        with_overrides(Params(), {"cluster.k": 0})
