"""The policy artifact: one directory with everything serving needs, verified on load.

``manifest.json`` (kind, ``FORMAT_VERSION``, features, arms, K, the SHA-256 of every
file and of itself) beside ``params.yaml``, ``preprocess.json``, ``student/``,
``statistics.npz``, ``budget_table.json`` and ``summary.json`` (docs/design.md). The
directory is written atomically and replaces only a policy. Loading recomputes every
hash, follows no entry outside the directory, checks every value that decides an
allocation (shapes, finite, scales > 0, costs >= 0), and refuses a missing,
truncated, edited or foreign file with one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx

from budgetalloc.data.contract import Preprocessor
from budgetalloc.errors import BudgetallocError, PolicyError
from budgetalloc.files import atomic_directory, json_text
from budgetalloc.method.statistics import ClusterStatistics
from budgetalloc.models.distill import StudentModel, load_student, save_student
from budgetalloc.params import Params, params_from_dict, params_to_dict, parse_yaml

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
POLICY_KIND = "budgetalloc-policy"
SELF_HASH = "manifest_sha256"
REQUIRED_FILES = ("params.yaml", "preprocess.json", "statistics.npz", "budget_table.json", "summary.json",
                  "student/config.json", "student/weights.msgpack")


@dataclass(frozen=True)
class Policy:
    """A fitted allocation policy."""

    feature_names: tuple[str, ...]
    n_arms: int
    binary_response: bool
    preprocessor: Preprocessor
    student: StudentModel
    statistics: ClusterStatistics
    budget_table: list[dict]
    params: Params
    summary: dict

    @property
    def k(self) -> int:
        return int(self.statistics.response.shape[0])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's written form without its own digest."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH}
    return hashlib.sha256(json_text(body).encode()).hexdigest()


def save_policy(policy: Policy, directory: str | Path) -> Path:
    """Write ``policy`` atomically to ``directory``, which is absent or a policy (it replaces
    nothing else: :func:`check_policy_target`); returns the directory."""
    directory = Path(directory)
    with atomic_directory(directory, replaceable=check_policy_target) as tmp:
        params = yaml.safe_dump(params_to_dict(policy.params), sort_keys=True)
        (tmp / "params.yaml").write_text(params)
        (tmp / "preprocess.json").write_text(json_text(policy.preprocessor.to_json()))
        save_student(policy.student, tmp / "student")
        policy.statistics.save(tmp / "statistics.npz")
        (tmp / "budget_table.json").write_text(json_text(policy.budget_table))
        (tmp / "summary.json").write_text(json_text(policy.summary))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "kind": POLICY_KIND,
            "format_version": FORMAT_VERSION,
            "feature_names": list(policy.feature_names),
            "n_arms": policy.n_arms,
            "binary_response": policy.binary_response,
            "k": policy.k,
            "files": {p.relative_to(tmp).as_posix(): _sha256(p) for p in files},
        }
        manifest[SELF_HASH] = _manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json_text(manifest))
    return directory


def check_policy_target(directory: str | Path) -> None:
    """Refuse a ``fit --out`` that is not absent and not a policy: only a policy is replaced.

    A path is replaced only if it is a directory (not a link) whose ``manifest.json``
    says it is a budgetalloc policy and which holds no file outside its manifest,
    and if it is not the current directory or one above it.

    Raises:
        BudgetallocError: one line naming the path and why it is kept.
    """
    directory = Path(directory)
    if directory.name in ("", ".", "..") and not directory.is_absolute():
        directory = Path(os.path.abspath(directory))
    if not os.path.lexists(directory):
        return
    keep = f"{directory}: refusing to replace it, as it is not a policy written by budgetalloc"
    if directory.is_symlink():
        raise BudgetallocError(f"{keep} (it is a symbolic link)")
    if not directory.is_dir():
        raise BudgetallocError(f"{keep} (it is a file)")
    here = Path(os.path.abspath(os.getcwd()))
    if Path(os.path.abspath(directory)) in (here, *here.parents):
        raise BudgetallocError(f"{directory}: refusing to replace the current directory (or one above it)")
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        listed = set(manifest["files"]) if isinstance(manifest, dict) and "format_version" in manifest else None
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    if listed is None:
        raise BudgetallocError(f"{keep} (no readable {MANIFEST}); choose another --out or remove it yourself")
    for name in sorted(_present_files(directory) - listed - {MANIFEST}):
        raise BudgetallocError(f"{directory}: refusing to replace this policy: it holds '{name}', "
                               "which is not part of it")


def _present_files(directory: Path) -> set[str]:
    """Every file and link below ``directory`` (links are not followed), as relative names."""
    found = set()
    for root, dirs, names in os.walk(directory):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add(Path(os.path.relpath(os.path.join(root, name), directory)).as_posix())
    return found


def check_not_policy_output(out: str | Path) -> None:
    """Refuse an output that would write into a policy (it would no longer verify)."""
    out = Path(os.path.abspath(out))
    for candidate in (out, out.parent):
        if (candidate / MANIFEST).is_file() and candidate.is_dir():
            raise BudgetallocError(f"{out}: is inside the policy directory {candidate}; write it elsewhere")


def _safe_entry(directory: Path, name, path: Path) -> Path:
    """The file a manifest entry names, which must lie inside the policy directory."""
    if not isinstance(name, str) or not name or "\\" in name or name.startswith("/") or \
            any(part in ("", ".", "..") for part in name.split("/")):
        raise PolicyError(f"{path}: entry {name!r} does not name a file inside the policy directory")
    target = directory / name
    if os.path.realpath(target) != os.path.join(os.path.realpath(directory), *name.split("/")):
        raise PolicyError(f"{path}: entry '{name}' leads outside the policy directory (a link)")
    return target


def _read_manifest(directory: Path) -> dict:
    """``manifest.json``, checked: its own digest, format version, kind and field types."""
    path = directory / MANIFEST
    try:
        text = path.read_bytes().decode("utf-8")  # not read_text: no newline translation
        manifest = json.loads(text)
        files = dict(manifest["files"])
        version = manifest["format_version"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise PolicyError(f"{path}: manifest is unreadable") from None
    if version != FORMAT_VERSION:
        raise PolicyError(f"{path}: format version {version!r}, this budgetalloc reads {FORMAT_VERSION} "
                          "(fit the policy again)")
    if SELF_HASH not in manifest:
        raise PolicyError(f"{path}: no '{SELF_HASH}' (edited, or written by an older budgetalloc)")
    if manifest[SELF_HASH] != _manifest_digest(manifest) or text != json_text(manifest):
        raise PolicyError(f"{path}: does not match its own hash (edited or truncated)")
    if manifest.get("kind") != POLICY_KIND:
        raise PolicyError(f"{path}: not a budgetalloc policy manifest")
    _check_manifest_fields(manifest, files, path)
    return manifest


def _check_manifest_fields(manifest: dict, files: dict, path: Path) -> None:
    names = manifest.get("feature_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise PolicyError(f"{path}: 'feature_names' must be a non-empty list of names")
    if len(set(names)) != len(names):
        raise PolicyError(f"{path}: 'feature_names' repeats a name")
    for key, low in (("n_arms", 2), ("k", 1)):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise PolicyError(f"{path}: '{key}' must be an integer >= {low}, got {value!r}")
    if not isinstance(manifest.get("binary_response"), bool):
        raise PolicyError(f"{path}: 'binary_response' must be true or false")
    for name in REQUIRED_FILES:
        if name not in files:
            raise PolicyError(f"{path}: lists no '{name}'")
    for name, digest in files.items():
        if not isinstance(digest, str) or len(digest) != 64:
            raise PolicyError(f"{path}: entry '{name}' has no SHA-256")


def verify_policy(directory: str | Path) -> dict:
    """Check the manifest (its own hash included) and every file hash; return the manifest.

    Raises:
        PolicyError: naming the directory or file and the first problem found.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyError(f"{directory}: policy directory not found")
    if not (directory / MANIFEST).is_file():
        raise PolicyError(f"{directory}: not a policy (no {MANIFEST})")
    manifest = _read_manifest(directory)
    files = manifest["files"]
    present = _present_files(directory) - {MANIFEST}
    for name in sorted(present - set(files)):
        raise PolicyError(f"{directory}: unexpected file '{name}' not in the manifest")
    for name, digest in sorted(files.items()):
        target = _safe_entry(directory, name, directory / MANIFEST)
        if target.is_symlink() or not target.is_file():
            raise PolicyError(f"{directory}: file '{name}' is missing")
        if _sha256(target) != digest:
            raise PolicyError(f"{directory}: file '{name}' does not match its hash (edited or truncated)")
    return manifest


def load_policy(directory: str | Path) -> Policy:
    """Verify and load a policy written by :func:`save_policy`.

    Raises:
        PolicyError: the policy is missing, incomplete, edited or incompatible.
    """
    directory = Path(directory)
    manifest = verify_policy(directory)
    try:
        params = params_from_dict(parse_yaml((directory / "params.yaml").read_text()),
                                  source=str(directory / "params.yaml"))
        policy = Policy(
            feature_names=tuple(manifest["feature_names"]),
            n_arms=int(manifest["n_arms"]),
            binary_response=bool(manifest["binary_response"]),
            preprocessor=Preprocessor.from_json(json.loads((directory / "preprocess.json").read_text())),
            student=load_student(directory / "student"),
            statistics=ClusterStatistics.load(directory / "statistics.npz"),
            budget_table=json.loads((directory / "budget_table.json").read_text()),
            params=params,
            summary=json.loads((directory / "summary.json").read_text()),
        )
    except BudgetallocError as err:
        raise PolicyError(f"{directory}: {err}") from None
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError, zipfile.BadZipFile) as err:
        raise PolicyError(f"{directory}: cannot load policy ({type(err).__name__}: {err})") from None
    _check_values(policy, directory, manifest)
    return policy


def _check_values(policy: Policy, directory: Path, manifest: dict) -> None:
    """Every value that decides an allocation is sane: shapes agree, finite, scales > 0, costs >= 0."""
    d, k, m = len(policy.feature_names), int(manifest["k"]), policy.n_arms
    pre = directory / "preprocess.json"
    for name in ("medians", "means", "scales"):
        values = getattr(policy.preprocessor, name)
        _check_array(values, (d,), pre, name)
    if (policy.preprocessor.scales <= 0).any():
        j = int(np.flatnonzero(policy.preprocessor.scales <= 0)[0])
        raise PolicyError(f"{pre}: scale of feature '{policy.feature_names[j]}' is "
                          f"{float(policy.preprocessor.scales[j])!r}, it must be > 0")
    stats, path = policy.statistics, directory / "statistics.npz"
    for name in ("counts", "response", "cost", "response_se", "cost_se"):
        _check_array(getattr(stats, name), (k, m), path, name)
    s = stats.response_scenarios.shape[0] if stats.response_scenarios.ndim == 3 else -1
    for name in ("response_scenarios", "cost_scenarios"):
        _check_array(getattr(stats, name), (s, k, m), path, name)
    for name in ("counts", "cost", "response_se", "cost_se", "cost_scenarios"):
        values = getattr(stats, name)
        if (values < 0).any():
            raise PolicyError(f"{path}: '{name}' has a negative value {float(values.min())!r}")
    student = directory / "student"
    if policy.student.n_features != d or policy.student.n_clusters != k:
        raise PolicyError(f"{student}: the student maps {policy.student.n_features} features to "
                          f"{policy.student.n_clusters} clusters, the policy has {d} features and {k} clusters")
    leaves = jax.tree.leaves(nnx.to_pure_dict(policy.student.params))
    if not all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves):
        raise PolicyError(f"{student}: the student's weights hold non-finite values")
    if not isinstance(policy.budget_table, list) or not all(isinstance(r, dict) for r in policy.budget_table):
        raise PolicyError(f"{directory / 'budget_table.json'}: not a list of budget levels")


def _check_array(values: np.ndarray, shape: tuple[int, ...], path: Path, name: str) -> None:
    if values.dtype.kind not in "fiu" or values.shape != shape or min(shape) < 1:
        raise PolicyError(f"{path}: '{name}' has shape {values.shape} ({values.dtype}), expected {shape} numbers")
    if not np.isfinite(values).all():
        raise PolicyError(f"{path}: '{name}' holds non-finite values")
