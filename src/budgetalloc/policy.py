"""The policy artifact: one directory with everything serving needs, verified on load.

Layout (``FORMAT_VERSION`` 1)::

    POLICY_DIR/
      manifest.json      format version, feature names, arms, sha256 of every file
      params.yaml        the params the policy was fitted with
      preprocess.json    imputation medians, means and scales, in feature order
      student/           the distilled classifier's weights and config (no pickle)
      statistics.npz     per-(cluster, arm) estimates and bootstrap scenarios
      budget_table.json  per-user budget level -> expected response, spend, arm shares
      summary.json       fit diagnostics (agreement, K, sizes, notes)

The directory is written to a temporary sibling and renamed into place, so a
crash never leaves a half-written policy. Loading recomputes every hash and
refuses a missing, truncated, edited or foreign file with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from budgetalloc.data import Preprocessor
from budgetalloc.distill import StudentModel, load_student, save_student
from budgetalloc.errors import BudgetallocError, PolicyError
from budgetalloc.files import atomic_directory
from budgetalloc.params import Params, params_from_dict, params_to_dict
from budgetalloc.statistics import ClusterStatistics

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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


def _dump_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_contents(policy: Policy, root: Path) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params_to_dict(policy.params), sort_keys=True))
    _dump_json(policy.preprocessor.to_json(), root / "preprocess.json")
    save_student(policy.student, root / "student")
    policy.statistics.save(root / "statistics.npz")
    _dump_json(policy.budget_table, root / "budget_table.json")
    _dump_json(policy.summary, root / "summary.json")


def save_policy(policy: Policy, directory: str | Path) -> Path:
    """Write ``policy`` atomically to ``directory`` (replacing an older one).

    Args:
        policy: the fitted policy.
        directory: target directory.

    Returns:
        The directory path.
    """
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        _write_contents(policy, tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format_version": FORMAT_VERSION,
            "feature_names": list(policy.feature_names),
            "n_arms": policy.n_arms,
            "binary_response": policy.binary_response,
            "k": policy.k,
            "files": {p.relative_to(tmp).as_posix(): _sha256(p) for p in files},
        }
        _dump_json(manifest, tmp / MANIFEST)
    return directory


def verify_policy(directory: str | Path) -> dict:
    """Check the manifest and every file hash; return the manifest.

    Raises:
        PolicyError: naming the directory and the first problem found.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise PolicyError(f"{directory}: policy directory not found")
    if not path.is_file():
        raise PolicyError(f"{directory}: not a policy (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
        version = manifest["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise PolicyError(f"{path}: manifest is unreadable") from None
    if version != FORMAT_VERSION:
        raise PolicyError(f"{path}: format version {version!r}, this budgetalloc reads {FORMAT_VERSION}")
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {MANIFEST}
    for name in sorted(present - set(files)):
        raise PolicyError(f"{directory}: unexpected file '{name}' not in the manifest")
    for name, digest in sorted(files.items()):
        target = directory / name
        if not target.is_file():
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
        params = params_from_dict(yaml.safe_load((directory / "params.yaml").read_text()),
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
    except (OSError, ValueError, KeyError) as err:
        raise PolicyError(f"{directory}: cannot load policy ({type(err).__name__}: {err})") from None
    _check_consistent(policy, directory)
    return policy


def _check_consistent(policy: Policy, directory: Path) -> None:
    k, m = policy.statistics.response.shape
    if m != policy.n_arms:
        raise PolicyError(f"{directory}: statistics have {m} arms, manifest says {policy.n_arms}")
    if len(policy.preprocessor.medians) != len(policy.feature_names):
        raise PolicyError(f"{directory}: preprocess.json has {len(policy.preprocessor.medians)} features, "
                          f"manifest names {len(policy.feature_names)}")
    if k != policy.student.n_clusters:
        raise PolicyError(f"{directory}: student predicts {policy.student.n_clusters} clusters, statistics have {k}")
