"""Policy integrity against a hostile editor: every byte of manifest.json is covered by its own
hash, every entry stays inside the directory, and a policy whose files were edited *and re-hashed*
is still refused when a value that decides an allocation is impossible. Errors name the file."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_reliability import one_error_line
from typer.testing import CliRunner

from budgetalloc.cli.app import app
from budgetalloc.errors import PolicyError
from budgetalloc.files import json_text
from budgetalloc.policy import MANIFEST, SELF_HASH, _manifest_digest, load_policy

runner = CliRunner()


@pytest.fixture()
def copy(tiny_fitted, tmp_path) -> Path:
    target = tmp_path / "policy"
    shutil.copytree(tiny_fitted[0], target)
    return target


def _manifest(policy: Path) -> dict:
    return json.loads((policy / MANIFEST).read_text())


def _write_manifest(policy: Path, manifest: dict, *, rehash: bool) -> None:
    if rehash:
        manifest[SELF_HASH] = _manifest_digest(manifest)
    (policy / MANIFEST).write_text(json_text(manifest))


def _rehash(policy: Path) -> None:
    """What an editor who knows the format does after changing a file: recompute every hash."""
    manifest = _manifest(policy)
    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256((policy / name).read_bytes()).hexdigest()
    _write_manifest(policy, manifest, rehash=True)


def _refused(policy: Path, *fragments: str) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(policy)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_one_flipped_byte_of_a_feature_name_is_refused(copy):
    raw = bytearray((copy / MANIFEST).read_bytes())
    at = raw.index(b'"x1"') + 2
    raw[at] ^= 0x01  # x1 -> x0... one bit
    (copy / MANIFEST).write_bytes(bytes(raw))
    _refused(copy, str(copy / MANIFEST), "does not match its own hash")


def test_swapped_feature_names_are_refused(copy):
    manifest = _manifest(copy)
    names = manifest["feature_names"]
    names[0], names[1] = names[1], names[0]
    _write_manifest(copy, manifest, rehash=False)
    _refused(copy, "does not match its own hash")


def test_whitespace_edits_of_the_manifest_are_refused(copy):
    text = (copy / MANIFEST).read_text()
    (copy / MANIFEST).write_text(text.replace("\n", "\r\n"))
    _refused(copy, "does not match its own hash")


def test_a_manifest_without_its_own_hash_is_refused(copy):
    manifest = _manifest(copy)
    del manifest[SELF_HASH]
    (copy / MANIFEST).write_text(json_text(manifest))
    _refused(copy, SELF_HASH)


def test_an_older_format_is_refused_with_what_to_do(copy):
    manifest = _manifest(copy)
    manifest["format_version"] = 1
    _write_manifest(copy, manifest, rehash=True)
    _refused(copy, "format version 1", "fit the policy again")


@pytest.mark.parametrize("entry", ["../outside.json", "/etc/hostname", "student/../../x", "a\\b", "", "./params.yaml"])
def test_manifest_entries_must_stay_inside(copy, entry):
    outside = copy.parent / "outside.json"
    outside.write_text("{}")
    manifest = _manifest(copy)
    manifest["files"][entry] = hashlib.sha256(b"{}").hexdigest()
    _write_manifest(copy, manifest, rehash=True)
    _refused(copy, "inside the policy directory")


def test_a_linked_file_is_refused(copy, tmp_path):
    real = tmp_path / "elsewhere.npz"
    shutil.move(copy / "statistics.npz", real)
    os.symlink(real, copy / "statistics.npz")
    _refused(copy, "statistics.npz")


def test_a_missing_required_entry_is_refused(copy):
    manifest = _manifest(copy)
    del manifest["files"]["preprocess.json"]
    (copy / "preprocess.json").unlink()
    _write_manifest(copy, manifest, rehash=True)
    _refused(copy, "lists no 'preprocess.json'")


@pytest.mark.parametrize("field,value,message", [
    ("n_arms", 0, "'n_arms' must be an integer"),
    ("n_arms", "5", "'n_arms' must be an integer"),
    ("k", True, "'k' must be an integer"),
    ("feature_names", ["x0", "x0"], "repeats a name"),
    ("feature_names", [], "non-empty list"),
    ("binary_response", "yes", "'binary_response'"),
    ("kind", "something-else", "not a budgetalloc policy"),
])
def test_rehashed_manifest_fields_are_checked(copy, field, value, message):
    manifest = _manifest(copy)
    manifest[field] = value
    _write_manifest(copy, manifest, rehash=True)
    _refused(copy, message)


def _edit_preprocess(policy: Path, key: str, index: int, value) -> None:
    path = policy / "preprocess.json"
    raw = json.loads(path.read_text())
    raw[key][index] = value
    path.write_text(json.dumps(raw))


def _edit_statistics(policy: Path, name: str, edit) -> None:
    path = policy / "statistics.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[name] = edit(arrays[name].copy())
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("damage,file,message", [
    ("zero_scale", "preprocess.json", "scale of feature 'x2' is 0.0"),
    ("negative_scale", "preprocess.json", "must be > 0"),
    ("short_medians", "preprocess.json", "'medians' has shape"),
    ("negative_cost", "statistics.npz", "'cost' has a negative value"),
    ("nan_response", "statistics.npz", "'response' holds non-finite values"),
    ("inf_cost_scenario", "statistics.npz", "'cost_scenarios' holds non-finite values"),
    ("wrong_shape", "statistics.npz", "'response' has shape"),
    ("text_array", "statistics.npz", "'cost' has shape"),
    ("nan_weights", "student", "non-finite"),
])
def test_rehashed_impossible_values_are_refused_naming_the_file(copy, damage, file, message):
    if damage == "zero_scale":
        _edit_preprocess(copy, "scales", 2, 0.0)
    elif damage == "negative_scale":
        _edit_preprocess(copy, "scales", 0, -1.0)
    elif damage == "short_medians":
        path = copy / "preprocess.json"
        raw = json.loads(path.read_text())
        raw["medians"] = raw["medians"][:-1]
        path.write_text(json.dumps(raw))
    elif damage == "negative_cost":
        _edit_statistics(copy, "cost", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, -1.0, a))
    elif damage == "nan_response":
        _edit_statistics(copy, "response", lambda a: np.where(a == a.max(), np.nan, a))
    elif damage == "inf_cost_scenario":
        _edit_statistics(copy, "cost_scenarios", lambda a: np.where(a == a.max(), np.inf, a))
    elif damage == "wrong_shape":
        _edit_statistics(copy, "response", lambda a: a[:, :-1])
    elif damage == "text_array":
        _edit_statistics(copy, "cost", lambda a: a.astype(str))
    else:
        import flax.serialization

        weights = copy / "student" / "weights.msgpack"
        tree = flax.serialization.msgpack_restore(weights.read_bytes())
        leaf = np.array(tree["hidden"]["kernel"])
        leaf[0, 0] = np.nan
        tree["hidden"]["kernel"] = leaf
        data = flax.serialization.msgpack_serialize(tree)
        weights.write_bytes(data)
        config = json.loads((copy / "student" / "config.json").read_text())
        config["sha256"] = hashlib.sha256(data).hexdigest()
        (copy / "student" / "config.json").write_text(json.dumps(config, indent=2))
    _rehash(copy)
    _refused(copy, str(copy / file), message)


def test_the_cli_refuses_a_rehashed_impossible_policy(copy, tiny_fitted, tmp_path):
    _, pop, _ = tiny_fitted
    pop.frame.iloc[:50].to_parquet(tmp_path / "pop.parquet")
    _edit_preprocess(copy, "scales", 0, 0.0)
    _rehash(copy)
    res = runner.invoke(app, ["allocate", "--policy", str(copy), "--users", str(tmp_path / "pop.parquet"),
                              "--budget", "5", "--out", str(tmp_path / "a.parquet")])
    assert "preprocess.json" in one_error_line(res)
    assert not (tmp_path / "a.parquet").exists()


def test_an_untouched_copy_loads(copy, tiny_fitted):
    assert load_policy(copy).k == load_policy(tiny_fitted[0]).k


def test_rehashed_params_with_a_repeated_key_are_refused(copy):
    path = copy / "params.yaml"
    path.write_text(path.read_text() + "seed: 99\n")
    _rehash(copy)
    _refused(copy, "duplicate key 'seed'")


def test_a_pipe_in_place_of_a_policy_file_does_not_hang(copy):
    (copy / "statistics.npz").unlink()
    os.mkfifo(copy / "statistics.npz")
    _refused(copy, "statistics.npz")
