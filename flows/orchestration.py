"""Prefect glue for the flows in ``flows/``: DVC stages as tasks, DVC outputs as dashboards.

The flows keep no state of their own. Every task runs its DVC stage with
``dvc repro`` (or a scenario with ``dvc exp run``), so ``dvc.lock`` and DVC's
experiments stay the record of what ran; what moves from task to task is the
stage outputs as ``dvc.lock`` records them (:class:`StageOutputs`); and every
Prefect artifact is a view of a file a stage wrote under ``reports/`` or
``models/``. This module has the plain functions; ``flows/`` wraps them in
tasks with their retry policies.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from budgetalloc.files import atomic_path
from budgetalloc.fit.pipeline import agreement_text
from budgetalloc.progress_line import parse_progress
from budgetalloc.serve import dashboards

#: The fit pipeline in ``dvc.yaml``, in order (``allocate`` is the scenario stage).
TRAINING_STAGES = ("prepare", "train", "cluster", "distill", "policy", "evaluate")
SCENARIO_STAGE = "allocate"

POLICY_DIR = "models/policy"
POLICY_CURVE = "reports/policy/budget_curve.csv"
POLICY_CURVE_PLOT = "reports/policy/budget_curve.png"
POLICY_CLUSTERS = "reports/policy/clusters.csv"
EVALUATION = "reports/evaluate/metrics.json"
EVALUATION_PLOT = "reports/evaluate/curve.png"
ALLOCATION = "allocations/allocation.parquet"
ALLOCATION_SUMMARY = "reports/allocation/summary.json"
ALLOCATION_CURVE = "reports/allocation/budget_curve.csv"
ALLOCATION_CLUSTERS = "reports/allocation/clusters.csv"
ALLOCATION_CURVE_PLOT = "reports/allocation/budget_curve.png"
ALLOCATION_CLUSTERS_PLOT = "reports/allocation/clusters.png"

_EXIT = re.compile(r"exited with (-?\d+)")
#: DVC's words for another DVC process holding the repository or one of its outputs.
_BUSY = ("Unable to acquire lock", "is busy, it is being blocked by")
#: Where a flow run records that it holds the workspace (``.dvc/tmp`` is ignored by git).
WORKSPACE_LOCK = ".dvc/tmp/budgetalloc-workspace.lock"
#: Hints DVC prints after every command; each is shown once per process.
_HINTS = ("To track the changes with git", "To enable auto staging", "git add ", "dvc config core.autostage",
          "Use `dvc push`")
_shown_hints: set[str] = set()


class DvcFailed(RuntimeError):
    """A ``dvc`` command failed; ``transient`` says whether trying again may help."""

    def __init__(self, args: list[str], returncode: int, output: str) -> None:
        self.args_ = args
        self.returncode = returncode
        self.output = output
        tail = "\n".join(output.strip().splitlines()[-15:])
        super().__init__(f"`dvc {' '.join(args)}` failed with exit code {returncode}:\n{tail}")

    @property
    def transient(self) -> bool:
        """Lock contention or a stage killed by a signal; not a bug, bad data or bad params."""
        if any(busy in self.output for busy in _BUSY):
            return True
        codes = [int(c) for c in _EXIT.findall(self.output)]
        return bool(codes) and (codes[-1] < 0 or codes[-1] >= 128)


@dataclass(frozen=True)
class StageOutputs:
    """A stage's outputs as ``dvc.lock`` records them: path -> md5."""

    stage: str
    outs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Revision:
    """What reproduces a flow run: a git commit, and the DVC experiment that records the workspace."""

    commit: str
    dirty: bool
    experiment: str | None = None

    def reproduce(self) -> str:
        """The command that brings this run's inputs (and, for an experiment, outputs) back."""
        if self.experiment:
            return f"dvc exp apply {self.experiment}"
        return f"git checkout {self.commit[:12]}"


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task only when its failure may pass."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, DvcFailed) and exc.transient


def stage_env(root: Path) -> dict[str, str]:
    """The environment of a ``dvc`` command in ``root``.

    This interpreter's ``python`` comes first on PATH (``dvc.yaml`` runs ``python -m``),
    output is unbuffered (progress lines arrive as they are printed), and where git
    has no identity, one is given: DVC's experiments are git commits.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    has_identity = all(
        subprocess.run(["git", "config", key], cwd=root, capture_output=True, check=False).returncode == 0
        for key in ("user.name", "user.email")
    )
    if not has_identity:
        for who in ("AUTHOR", "COMMITTER"):
            env.setdefault(f"GIT_{who}_NAME", "budgetalloc")
            env.setdefault(f"GIT_{who}_EMAIL", "budgetalloc@localhost")
    return env


def shown_once(line: str) -> bool:
    """Whether ``line`` should be shown: not blank, and not a DVC hint already shown in this process."""
    text = line.strip()
    if not text:
        return False
    if text.startswith(_HINTS):
        if text in _shown_hints:
            return False
        _shown_hints.add(text)
    return True


@contextmanager
def workspace_lock(root: Path, holder: str, *, on_wait: Callable[[str], None] | None = None,
                   poll_s: float = 1.0) -> Iterator[None]:
    """Hold the DVC workspace of ``root`` for one flow run; wait while another run holds it.

    Runs that share a workspace (a schedule, a scenario, ``make run``) would otherwise
    collide on DVC's locks or change each other's inputs between stages: the flows hold
    this lock (``flock`` on :data:`WORKSPACE_LOCK`) around all their DVC work and reads.
    The kernel releases it when the process ends, however it ends.
    """
    path = Path(root) / WORKSPACE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        waited = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and on_wait is not None:
                    fh.seek(0)
                    on_wait(f"waiting for the DVC workspace {root}: held by {fh.read().strip() or 'another run'}")
                waited = True
                time.sleep(poll_s)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{holder} (pid {os.getpid()})")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_dvc(root: Path, args: list[str], *, on_line: Callable[[str], None] | None = None) -> str:
    """Run ``dvc ARGS`` in ``root`` and return its output, streaming each line to ``on_line``.

    Blank lines and repeated DVC hints (``git add dvc.lock``, ...) are not streamed.

    Raises:
        DvcFailed: the command exited with a non-zero code.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=stage_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if on_line is not None and shown_once(line):
            on_line(line.rstrip("\n"))
    output = "".join(lines)
    if proc.wait() != 0:
        raise DvcFailed(args, proc.returncode, output)
    return output


def read_lock(root: Path) -> dict:
    """The stages of ``dvc.lock`` (empty before the first run)."""
    path = Path(root) / "dvc.lock"
    return yaml.safe_load(path.read_text()).get("stages", {}) if path.exists() else {}


def stage_outputs(root: Path, stage: str) -> StageOutputs:
    """The outputs of ``stage`` recorded in ``dvc.lock``."""
    entry = read_lock(root).get(stage, {})
    return StageOutputs(stage, {o["path"]: o.get("md5", "") for o in entry.get("outs", [])})


def check_consumed(root: Path, stage: str, upstream: Iterable[StageOutputs]) -> None:
    """Check that ``stage`` ran on exactly the upstream outputs it was handed.

    Raises:
        RuntimeError: ``dvc.lock`` records another version of an upstream output
            (someone changed it while the flow ran).
    """
    deps = {d["path"]: d.get("md5", "") for d in read_lock(root).get(stage, {}).get("deps", [])}
    for up in upstream:
        for path, md5 in up.outs.items():
            if path in deps and deps[path] != md5:
                raise RuntimeError(f"stage {stage} read {path} at {deps[path]}, but {up.stage} wrote {md5}")


def repro_stage(root: Path, stage: str, upstream: Iterable[StageOutputs] = (), *,
                on_line: Callable[[str], None] | None = None) -> StageOutputs:
    """``dvc repro --single-item STAGE`` (skipped by DVC when nothing changed); its outputs.

    Args:
        root: the repository.
        stage: a stage of ``dvc.yaml``.
        upstream: outputs of the stages it depends on, checked against what it read.
        on_line: receives every output line (progress, notes).

    Returns:
        The stage's outputs recorded in ``dvc.lock``.
    """
    run_dvc(root, ["repro", "--single-item", stage], on_line=on_line)
    check_consumed(root, stage, upstream)
    return stage_outputs(root, stage)


def progress_follower(on_progress: Callable[[float], None]) -> Callable[[str], None]:
    """A line callback that reports a stage's epoch progress (0..1) from its progress lines."""

    def follow(line: str) -> None:
        parsed = parse_progress(line)
        if parsed is not None:
            _, done, total = parsed
            on_progress(done / max(total, 1))

    return follow


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def git_revision(root: Path) -> Revision:
    """HEAD, and whether tracked files differ from it."""
    return Revision(_git(root, "rev-parse", "HEAD"), bool(_git(root, "status", "--porcelain", "--untracked-files=no")))


#: What the stages write that git tracks (dvc.lock, small reports, DVC's .gitignore files).
RECORD_PATHS = ("dvc.lock", "reports", "models", "prepared", "allocations")


def untracked_records(root: Path) -> list[str]:
    """Files under :data:`RECORD_PATHS` that git neither tracks nor ignores."""
    listed = _git(root, "ls-files", "--others", "--exclude-standard", "--", *RECORD_PATHS)
    return listed.splitlines()


def save_experiment(root: Path, name: str, stage: str = TRAINING_STAGES[-1]) -> Revision:
    """Record the workspace up to ``stage`` (params, ``dvc.lock``, outputs) as the DVC experiment ``name``.

    Only ``stage`` and its upstream are committed: a scenario left in the workspace
    from an older policy stays recorded as out of date rather than being signed off.
    """
    include = [arg for path in untracked_records(root) for arg in ("-I", path)]
    run_dvc(root, ["exp", "save", "--force", "-n", name, *include, stage])
    return Revision(git_revision(root).commit, False, name)


def experiment_name(prefix: str, run_name: str | None, run_id: str | None) -> str:
    """A DVC experiment name (a valid git ref) for a flow run."""
    parts = [prefix, run_name or "", (run_id or "")[:8]]
    name = "-".join(p for p in parts if p)
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")


def current_params(root: Path) -> dict:
    """``params.yaml`` as a plain mapping."""
    return yaml.safe_load((Path(root) / "params.yaml").read_text()) or {}


def scenario_sets(root: Path, budget: float | None, users: str | Path | None) -> list[str]:
    """The ``-S`` arguments of a scenario: only the keys that differ from ``params.yaml``."""
    allocate = current_params(root).get("allocate", {})
    sets = []
    if budget is not None and float(budget) != float(allocate.get("budget", float("nan"))):
        sets += ["-S", f"allocate.budget={float(budget)!r}"]
    if users is not None and Path(users).as_posix() != allocate.get("users"):
        sets += ["-S", f"allocate.users={Path(users).as_posix()}"]
    return sets


def run_scenario(root: Path, *, name: str, budget: float | None, users: str | Path | None,
                 on_line: Callable[[str], None] | None = None) -> Revision:
    """Allocate ``users`` under ``budget`` as the DVC experiment ``name`` (``dvc exp run``).

    Keys equal to ``params.yaml``'s values are not passed with ``-S``
    (:func:`scenario_sets`). Upstream stages run too when they are not up to date.
    A scenario with other values changes the workspace; :func:`defaults_kept` puts it back.
    """
    sets = scenario_sets(root, budget, users)
    run_dvc(root, ["exp", "run", "-n", name, *sets, SCENARIO_STAGE], on_line=on_line)
    return Revision(git_revision(root).commit, False, name)


def stage_files(root: Path, stage: str) -> list[str]:
    """The files ``stage`` writes (its outs, metrics and plots in ``dvc.yaml``)."""
    spec = yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"][stage]
    entries = [e for key in ("outs", "metrics", "plots") for e in spec.get(key) or []]
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def _restore(path: Path, data: bytes | None) -> None:
    if data is None:
        path.unlink(missing_ok=True)  # the scenario wrote it
    elif not path.is_file() or path.read_bytes() != data:
        with atomic_path(path) as tmp:  # a new file: never writes through a link into DVC's cache
            Path(tmp).write_bytes(data)


@contextmanager
def defaults_kept(root: Path, scenario: bool = True) -> Iterator[None]:
    """Put ``params.yaml``, ``dvc.lock`` and the scenario stage's files back as they were.

    A scenario with its own budget or population (``dvc exp run -S ...``) writes its
    params, lock entry and outputs into the workspace; the experiment keeps them
    (``dvc exp apply NAME``), and the workspace goes back to its defaults, so that
    the next run or schedule does not inherit the scenario. With ``scenario`` false
    (the default scenario) nothing is put back.
    """
    if not scenario:
        yield
        return
    root = Path(root)
    kept = ["params.yaml", "dvc.lock", *stage_files(root, SCENARIO_STAGE)]
    saved = {rel: (root / rel).read_bytes() if (root / rel).is_file() else None for rel in kept}
    try:
        yield
    finally:
        for rel, data in saved.items():
            if data is not None or rel not in ("params.yaml", "dvc.lock"):
                _restore(root / rel, data)


# ---- views of the stage outputs, for artifacts ---------------------------------------------


def frame_records(df: pd.DataFrame) -> list[dict]:
    """A DataFrame as JSON-safe records (what a Prefect table artifact takes)."""
    return json.loads(df.to_json(orient="records"))


def read_csv_table(root: Path, path: str) -> list[dict]:
    """A table a stage wrote (budget curve, clusters), one record per row."""
    return frame_records(pd.read_csv(Path(root) / path))


def policy_clusters(root: Path, level: float | None) -> tuple[pd.DataFrame, dict]:
    """Clusters of the fitted policy with the arm chosen at budget ``level`` (default: the middle one),
    and the budget-table row of that level."""
    table = json.loads((Path(root) / POLICY_DIR / "budget_table.json").read_text())
    row, arms = dashboards.chosen_arms(table, level)
    return pd.read_csv(Path(root) / POLICY_CLUSTERS).assign(chosen_arm=arms), row


def read_png(root: Path, path: str) -> bytes:
    """A PNG a stage wrote."""
    return (Path(root) / path).read_bytes()


def card(caption: str, png: bytes) -> str:
    """An artifact description: a caption, then the picture itself (a ``data:`` URI).

    Prefect's UI renders each artifact's description as markdown on the flow run's
    Artifacts tab, so the picture shows there, not only on the artifact's own page.
    """
    return f"{caption}\n\n{dashboards.markdown_image(png, caption)}"


def curve_markdown(root: Path, png: str, csv: str, title: str) -> str:
    """A budget curve: its picture, then its table at 3 significant digits."""
    rows = dashboards.analyst_table(pd.read_csv(Path(root) / csv))
    columns = [c for c in ("budget", "expected_response", "expected_spend", "level", "status") if c in rows[0]]
    return "\n\n".join([f"# {title}", dashboards.markdown_image(read_png(root, png), title), _md_table(rows, columns),
                         f"Table: `{csv}`; picture: `{png}`."])


def cost_curve_markdown(root: Path) -> str:
    """The held-out cost curve with its 95% band: picture and table."""
    m = read_json(root, EVALUATION)
    rows = [{k: dashboards.significant(v) for k, v in r.items()} for r in m["curve"]]
    return "\n\n".join([
        f"# Test-trial cost curve (AUCC {m['aucc']:.3f})",
        dashboards.markdown_image(read_png(root, EVALUATION_PLOT), "cost curve on the held-out test trial"),
        "IPS estimate of the response per user at each spend, with its 95% confidence band.",
        _md_table(rows, ("budget", "cost", "response", "response_lo", "response_hi", "status")),
    ])


def clusters_markdown(png: bytes, title: str) -> str:
    """The clusters as a picture: size, chosen arm, response per cost."""
    note = ("Each point is a cluster: its size, and the extra response per extra unit of cost that its "
            "chosen arm buys over control (for clusters left at control: the best coupon's ratio).")
    return "\n\n".join([f"# {title}", dashboards.markdown_image(png, title), note])


def read_json(root: Path, path: str) -> dict:
    """A JSON report."""
    return json.loads((Path(root) / path).read_text())


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _md_table(rows: list[dict], columns: Iterable[str]) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def evaluation_markdown(root: Path) -> str:
    """The evaluation metrics: AUCC, the references and the held-out cost curve."""
    m = read_json(root, EVALUATION)
    control, coupon = m["references"]["control"], m["references"]["random_coupon"]
    lines = [
        "## Evaluation on the held-out test split",
        f"- AUCC: **{m['aucc']:.4f}** (random ranking about 0.5) on {m['n_test']} users, K = {m['k']}",
        f"- all control: response {control['response']:.4g} per user at spend {control['cost']:.4g}",
        f"- random coupon: response {coupon['response']:.4g} per user at spend {coupon['cost']:.4g}",
        "",
        "The cost curve (IPS estimates per user at each budget, 95% band) is its own artifact.",
        "",
        f"Plot: `{EVALUATION_PLOT}`; all metrics: `{EVALUATION}`.",
    ]
    return "\n".join(lines)


def revision_markdown(rev: Revision) -> str:
    """Which DVC revision or experiment reproduces the run, and how."""
    dirty = " (the workspace differs)" if rev.dirty else ""
    lines = ["## Reproduce", f"- git commit: `{rev.commit[:12]}`{dirty}"]
    if rev.experiment:
        lines.append(f"- DVC experiment: `{rev.experiment}` (listed by `dvc exp show`)")
    lines.append(f"- `{rev.reproduce()}`")
    return "\n".join(lines)


def training_markdown(root: Path, rev: Revision) -> str:
    """The training run's report: fit summary, evaluation metrics, revision."""
    s = read_json(root, f"{POLICY_DIR}/summary.json")
    fit = [
        "# Training run",
        f"- trial rows: {s['rows']} ({s['train_rows']} train / {s['honest_rows']} honest)",
        f"- clusters K = {s['k']}, arms = {s['n_arms']}",
        f"- student agreement with the teacher (held-out): {agreement_text(s)}",
        f"- representation epochs: {s['representation_epochs']}",
        *(f"- note: {n}" for n in s["notes"]),
    ]
    where = f"Policy: `{POLICY_DIR}`; budget curve: `{POLICY_CURVE}`; clusters: `{POLICY_CLUSTERS}`."
    return "\n\n".join(["\n".join(fit), evaluation_markdown(root), revision_markdown(rev), where])


def allocation_markdown(root: Path, rev: Revision) -> str:
    """The scenario's report: totals, arms, the policy's evaluation metrics, the experiment."""
    s = read_json(root, ALLOCATION_SUMMARY)
    arms = ", ".join(f"{k.removeprefix('arm_')}: {v}" for k, v in s["users_per_arm"].items())
    scenario = [
        "# Allocation scenario",
        f"- population: `{s['population']}` ({s['users']} users)",
        f"- budget: **{s['budget']:.6g}**",
        f"- expected spend: {s['expected_spend']:.6g} ({s['expected_spend_per_user']:.4g} per user)",
        f"- expected response: {s['expected_response']:.6g} ({s['expected_response_per_user']:.4g} per user)",
        f"- unspent (it would buy nothing more): {s['unspent']:.6g}; solver: {s['solver_status']}",
        f"- users per arm: {arms}",
    ]
    where = (f"Allocation: `{ALLOCATION}`; report: `{ALLOCATION_SUMMARY}`, `{ALLOCATION_CURVE}`, "
             f"`{ALLOCATION_CLUSTERS}`.")
    return "\n\n".join(["\n".join(scenario), evaluation_markdown(root), revision_markdown(rev), where])


def where_markdown(root: Path) -> str:
    """Where the outputs of the pipeline are."""
    return "\n".join(f"- {what}: {Path(root) / path}" for what, path in (
        ("policy", POLICY_DIR),
        ("evaluation metrics and plot", "reports/evaluate/"),
        ("budget curve and clusters of the policy", "reports/policy/"),
        ("allocation", ALLOCATION),
        ("allocation report", "reports/allocation/"),
    ))


def benchmark_markdown(summary: list[dict], settings: dict, rev: Revision, out: Path) -> str:
    """The benchmark run's report: what ran, the summary table, the revision."""
    columns = ("case", "method", "capture_mean", "capture_min", "matched_mean", "matched_min", "spend_ratio_max",
               "aucc", "fit_s")
    lines = [
        "# Benchmark",
        *(f"- {key}: {value}" for key, value in settings.items()),
        "",
        "Capture: share of the oracle's uplift over all-control; spend ratio: true spend / budget.",
        "",
        _md_table(summary, columns),
    ]
    rerun = "Rerun: `python -m flows.benchmark` (or the `benchmark/on-demand` deployment) with these settings."
    return "\n\n".join(["\n".join(lines), revision_markdown(rev), rerun, f"Results: `{out}`."])
