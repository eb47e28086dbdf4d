"""Scale benchmark: fit on 1M trial rows, allocate 1M and 10M users, program vs Lagrangian, Dask.

Targets (issue "Scale-out", 2 CPU cores): allocate 10M users x 40 features from one
Parquet file through the CLI in <= 60 s with peak RSS <= 2 GiB; fit on 1M rows in
<= 5 minutes; the program's time does not grow with users and is >= 100x faster
than the per-user Lagrangian at 10M users.

Every step runs as its own subprocess through the CLI (``budgetalloc fit``,
``budgetalloc allocate``), timed from outside; peak memory is the kernel's peak
RSS of the command (``ru_maxrss``) and, for the Dask runs whose workers are
separate processes, the largest sum of RSS over the process tree sampled every
0.1 s. The load average is recorded next to every timing, since other jobs may
share the machine. Writes ``reports/scale.json`` and ``reports/scale.md``.

    python benchmarks/scale.py [--workdir /tmp/budgetalloc-scale] [--steps data,fit,allocate,in_memory,program,dask]
                               [--baseline-src OTHER_CHECKOUT/src]

``fit_paths`` fits the same Parquet trial (``--fit-rows`` x 40, 1M by default) twice
through the CLI, streamed (``fit --stream``) and whole in memory (``--no-stream``),
and checks that the two policies hold the same bytes (all but the summary's
``fit_path`` and the manifest that hashes it). ``--baseline-src`` runs each fit first
with another checkout's code (before / after in one run, on the same load).

``in_memory`` runs the previous whole-file path at 1M users (``in_memory_10m`` adds
10M: about 15 GiB) and checks that the streaming output has the same bytes.

Data are generated once into ``--workdir`` (10M x 40 float32 is 1.7 GB on disk),
streamed chunk by chunk from the simulator, never 10M rows in memory at once.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Annotated

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import typer

from budgetalloc.files import atomic_path, write_json
from budgetalloc.params import SimulateParams
from budgetalloc.studies.simulate import simulate_population, simulate_trial

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from budgetalloc.cli import main; main()"]  # the console script, any layout
CHUNK_ROWS = 1 << 20  # rows simulated at once; also the population's row group


def write_population(path: Path, n_users: int, n_features: int, *, seed: int) -> Path:
    """A simulated population streamed to Parquet one row group (``CHUNK_ROWS``) at a time."""
    if path.exists():
        return path
    sim = SimulateParams(n_features=n_features)
    with atomic_path(path) as tmp:
        writer = None
        for i, start in enumerate(range(0, n_users, CHUNK_ROWS)):
            rows = min(CHUNK_ROWS, n_users - start)
            world = simulate_population(sim, seed=seed + i, n_users=rows, id_offset=10**9 + start)
            table = pa.Table.from_pandas(world.frame, preserve_index=False)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table, row_group_size=CHUNK_ROWS)
        writer.close()
    return path


def write_trial(path: Path, n_users: int, n_features: int, *, seed: int) -> Path:
    """A simulated randomized trial (1M x 40 fits in memory: 160 MB of features)."""
    if not path.exists():
        world = simulate_trial(SimulateParams(n_features=n_features), seed=seed, n_users=n_users)
        with atomic_path(path) as tmp:
            pq.write_table(pa.Table.from_pandas(world.frame, preserve_index=False), tmp)
    return path


# -- measuring ------------------------------------------------------------------------------


def machine() -> dict:
    """What the numbers were measured on."""
    import jax

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "pyarrow": pa.__version__,
    }


class TreeSampler:
    """Largest summed RSS of a process and its descendants, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.peak = max(self.peak, sum(_rss(p) for p in procs))
            except psutil.Error:
                pass
            time.sleep(self.interval)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0


def measured(cmd: list[str], *, cwd: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; wall time, the kernel's peak RSS of its largest process, sampled tree RSS, load."""
    timing = cwd / ".time"
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(timing), *cmd], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = TreeSampler(proc.pid)
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    tree = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return {
        "wall_s": round(wall, 2),
        "peak_rss_gib": round(int(timing.read_text().split()[-1]) / 2**20, 3),
        "peak_tree_rss_gib": round(tree / 2**30, 3),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "output_tail": output.strip().splitlines()[-4:],
    }


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return round(best, 4), result


# -- steps ---------------------------------------------------------------------------------


def budget_for(policy_dir: Path, n_users: int, level: float = 0.2) -> float:
    """The policy's per-user budget at ``level`` of its table, times ``n_users``."""
    table = json.loads((policy_dir / "budget_table.json").read_text())
    row = min(table, key=lambda r: abs(r["level"] - level))
    return round(row["budget_per_user"] * n_users, 2)


def step_fit(work: Path, trial: Path) -> dict:
    """``budgetalloc fit`` on the 1M-row trial with default params."""
    result = measured([*CLI, "fit", "--data", str(trial), "--out", "policy"], cwd=work)
    summary = json.loads((work / "policy" / "summary.json").read_text())
    return result | {"rows": summary["rows"], "k": summary["k"],
                     "student_agreement": summary["student_agreement"]}


def same_policy(a: Path, b: Path) -> bool:
    """Two policy directories with the same files and bytes, but the summary's fit_path and the manifest."""
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    if files != sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()):
        return False
    for name in files:
        if name == "summary.json":
            sa, sb = (json.loads((d / name).read_text()) for d in (a, b))
            sa.pop("fit_path"), sb.pop("fit_path")
            if sa != sb:
                return False
        elif name != "manifest.json" and not same_bytes(a / name, b / name):
            return False
    return True


def step_fit_paths(work: Path, trial: Path, baseline: Path | None = None) -> dict:
    """``budgetalloc fit`` on one Parquet trial, streamed and in memory (default params).

    With ``baseline`` (the ``src`` folder of another checkout), each fit runs first with
    that code on the import path, then with this one: before and after in the same run.
    """
    out: dict = {"baseline": {"source": baseline_name(baseline)}} if baseline else {}
    for name, flag in (("streamed", "--stream"), ("in_memory", "--no-stream")):
        if baseline:
            env = os.environ | {"PYTHONPATH": str(baseline)}
            result = measured([*CLI, "fit", "--data", str(trial), "--out", f"baseline-{name}", flag],
                              cwd=work, env=env)
            out["baseline"][name] = result | {"rows": json.loads(
                (work / f"baseline-{name}" / "summary.json").read_text())["rows"]}
        result = measured([*CLI, "fit", "--data", str(trial), "--out", f"policy-{name}", flag], cwd=work)
        summary = json.loads((work / f"policy-{name}" / "summary.json").read_text())
        out[name] = result | {"rows": summary["rows"], "fit_path": summary["fit_path"], "k": summary["k"],
                              "student_agreement": summary["student_agreement"]}
    out["identical_policy"] = same_policy(work / "policy-streamed", work / "policy-in_memory")
    return out


def baseline_name(src: Path) -> str:
    """The commit of the checkout that holds ``src``, or the folder when it is no git checkout."""
    found = subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h %s"], check=False,
                           capture_output=True, text=True)
    return found.stdout.strip()[:80] if found.returncode == 0 else str(src)


def step_allocate(work: Path, users: Path, n_users: int, *, extra: list[str] = (), out: str) -> dict:
    """``budgetalloc allocate`` through the CLI at the 0.2 budget level."""
    budget = budget_for(work / "policy", n_users)
    cmd = [*CLI, "allocate", "--policy", "policy", "--users", str(users), "--budget", str(budget),
           "--out", out, *extra]
    return measured(cmd, cwd=work) | {"users": n_users, "budget": budget}


IN_MEMORY = """
import sys
from budgetalloc.serve.allocate import allocate_population
from budgetalloc.data.contract import load_population
from budgetalloc.files import write_table
from budgetalloc.policy import load_policy
policy = load_policy("policy")
allocation = allocate_population(policy, load_population(sys.argv[1], policy.feature_names), float(sys.argv[2]))
write_table(allocation.frame, sys.argv[3])
"""

DASK_THREADS = """
import sys
from budgetalloc.serve.allocate import allocate_distributed
if __name__ == "__main__":
    allocate_distributed("policy", sys.argv[1], float(sys.argv[2]), sys.argv[3], processes=False)
"""


def step_in_memory(work: Path, users: Path, n_users: int, out: str) -> dict:
    """The previous path (whole file in memory), for comparison and as the reference bytes."""
    budget = budget_for(work / "policy", n_users)
    return measured([sys.executable, "-c", IN_MEMORY, str(users), str(budget), out], cwd=work) | {
        "users": n_users, "budget": budget}


def step_dask_threads(work: Path, users: Path, n_users: int, out: str) -> dict:
    """The Dask flow on a LocalCluster of 2 threads (no worker processes)."""
    budget = budget_for(work / "policy", n_users)
    return measured([sys.executable, "-c", DASK_THREADS, str(users), str(budget), out], cwd=work) | {
        "users": n_users, "budget": budget}


def per_user_estimates(n: int, n_arms: int) -> tuple[np.ndarray, np.ndarray]:
    """Random per-user response and cost (n, M): increasing in the arm, control free."""
    rng = np.random.default_rng(0)
    r = rng.uniform(0, 1, (n, n_arms)) * np.linspace(1, 1.6, n_arms)
    c = rng.uniform(0.5, 1.5, (n, n_arms)) * np.arange(n_arms)
    return r, c


def step_program(work: Path, sizes_10m: np.ndarray, n_arms: int) -> dict:
    """The cluster program at 1M and 10M users against the per-user Lagrangian on (n, M) arrays."""
    from budgetalloc.method.lagrangian import lagrangian_allocation
    from budgetalloc.policy import load_policy
    from budgetalloc.serve.allocate import program_for

    policy = load_policy(work / "policy")
    out = {}
    for n in (1_000_000, 10_000_000):
        sizes = np.round(sizes_10m * n / sizes_10m.sum()).astype(np.int64)
        budget = budget_for(work / "policy", int(sizes.sum()))
        program = program_for(policy)
        first, _ = timed(partial(program.solve, sizes, budget))  # builds and canonicalises once
        again, _ = timed(partial(program.solve, sizes, budget), repeat=3)
        r, c = per_user_estimates(n, n_arms)
        lagrangian, _ = timed(partial(lagrangian_allocation, r, c, 0.2 * c[:, -1].sum()))
        del r, c
        out[f"{n // 1_000_000}M"] = {"program_first_s": first, "program_resolve_s": again,
                                      "lagrangian_s": lagrangian, "speedup": round(lagrangian / again, 1),
                                      "load": round(os.getloadavg()[0], 2)}
    return out


def cluster_sizes_of(allocation: Path, k: int) -> np.ndarray:
    """Users per cluster in an allocation file."""
    clusters = pq.read_table(allocation, columns=["cluster"]).column("cluster").to_numpy()
    return np.bincount(clusters, minlength=k)


# -- report ---------------------------------------------------------------------------------


def targets(results: dict) -> dict:
    """The issue's targets, met or not (None where not measured)."""
    alloc = results.get("allocate", {}).get("streaming_10M")
    paths = results.get("fit_paths", {})
    fit = results.get("fit") or (max((paths[k] for k in ("streamed", "in_memory") if k in paths),
                                     key=lambda r: r["wall_s"]) if paths else None)
    prog = results.get("program", {}).get("10M")
    return {
        "allocate_10M_wall_le_60s": None if alloc is None else alloc["wall_s"] <= 60,
        "allocate_10M_peak_rss_le_2GiB": None if alloc is None else alloc["peak_rss_gib"] <= 2,
        "fit_1M_le_300s": None if fit is None else fit["wall_s"] <= 300,
        "program_10M_ge_100x_lagrangian": None if prog is None else prog["speedup"] >= 100,
    }


def _by_users(runs: dict) -> list[tuple[str, dict]]:
    """The timed runs of a step, fewest users first."""
    return sorted(((k, v) for k, v in runs.items() if isinstance(v, dict) and "wall_s" in v),
                  key=lambda item: item[1]["users"])


def _row(name: str, r: dict) -> str:
    return (f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['peak_tree_rss_gib']:.2f} "
            f"| {r['load_before']:.1f} / {r['load_after']:.1f} |")


def markdown(results: dict) -> str:
    """``reports/scale.md``: the machine, every timing with its load, the targets."""
    m = results["machine"]
    lines = ["# Scale benchmark", "",
             (f"Machine: {m['cpus']} CPU cores ({m['cpu_model']}), {m['memory_gib']} GiB RAM, "
              f"{m['platform']}, Python {m['python']}, JAX {m['jax']} on {', '.join(m['jax_devices'])}, "
              f"pyarrow {m['pyarrow']}. The machine is shared: the 1-minute load average before / after "
              "each run is given (2.0 means both cores busy)."), "",
             "Produced by `python benchmarks/scale.py`; raw numbers in `reports/scale.json`.", "",
             "| run | wall s | peak RSS GiB (largest process) | peak RSS GiB (all processes) | load |",
             "|---|---|---|---|---|"]
    if "fit" in results:
        lines.append(_row(f"fit, {results['fit']['rows']:,} trial rows x 40 (CLI)", results["fit"]))
    for name in ("streamed", "in_memory"):
        r = results.get("fit_paths", {}).get(name)
        if r is not None:
            how = "streamed (--stream)" if name == "streamed" else "whole in memory (--no-stream)"
            lines.append(_row(f"fit from Parquet, {how}, {r['rows']:,} trial rows x 40", r))
            before = results["fit_paths"].get("baseline", {}).get(name)
            if before is not None:
                lines.append(_row(f"same, before: {results['fit_paths']['baseline']['source']}", before))
    for name, r in _by_users(results.get("allocate", {})):
        lines.append(_row(f"allocate {name} ({r['users']:,} users x 40)", r))
    for name, r in _by_users(results.get("in_memory", {})):
        lines.append(_row(f"previous path, whole file in memory, {name[10:]} users x 40", r))
    for name, r in _by_users(results.get("dask", {})):
        lines.append(_row(f"dask {name} ({r['users']:,} users x 40)", r))
    checks = {**results.get("in_memory", {}).get("identical", {}), **results.get("dask", {}).get("identical", {})}
    if "fit_paths" in results:
        checks["fit_streamed_vs_in_memory_policy"] = results["fit_paths"]["identical_policy"]
    if checks:
        lines += ["", "Byte-identical outputs: " + ", ".join(f"{k}: {v}" for k, v in checks.items()) + "."]
    if "program" in results:
        lines += ["", ("| users | program, first solve s | program, re-solve s | per-user Lagrangian s "
                       "| Lagrangian / re-solve | load |"), "|---|---|---|---|---|---|"]
        for n, r in sorted(results["program"].items(), key=lambda item: int(item[0][:-1])):
            lines.append(f"| {n} | {r['program_first_s']:.3f} | {r['program_resolve_s']:.3f} "
                         f"| {r['lagrangian_s']:.2f} | {r['speedup']:.0f}x | {r['load']:.1f} |")
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {name} | {'n/a' if met is None else ('yes' if met else 'NO')} |"
              for name, met in targets(results).items()]
    return "\n".join(lines) + "\n"


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (read in chunks)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 24), fb.read(1 << 24)
            if x != y:
                return False
            if not x:
                return True


def main(
    workdir: Annotated[Path, typer.Option(help="data, policy and outputs (1.7 GB for 10M x 40)")] = Path(
        "/tmp/budgetalloc-scale"),
    steps: Annotated[str, typer.Option(
        help="comma-separated: data,fit,allocate,in_memory,program,dask,fit_paths; in_memory_10m adds the "
             "previous whole-file path at 10M users (about 15 GiB); 'report' only rewrites the report"),
    ] = "data,fit,allocate,in_memory,program,dask",
    reports: Annotated[Path, typer.Option(help="where scale.json and scale.md go")] = ROOT / "reports",
    fit_rows: Annotated[int, typer.Option(help="trial rows of the fit_paths step (x 40 features)")] = 1_000_000,
    baseline_src: Annotated[Path | None, typer.Option(
        help="fit_paths: also fit with this src folder of another checkout first (before / after)")] = None,
) -> None:
    """Run the scale benchmark steps and write ``reports/scale.json`` and ``reports/scale.md``."""
    chosen = set(steps.split(","))
    workdir.mkdir(parents=True, exist_ok=True)
    previous = reports / "scale.json"
    results = json.loads(previous.read_text()) if previous.exists() else {}
    results["machine"] = machine()
    trial, users_1m, users_10m = (workdir / "trial-1m.parquet", workdir / "users-1m.parquet",
                                  workdir / "users-10m.parquet")
    if "data" in chosen:
        seconds, _ = timed(lambda: (write_trial(trial, 1_000_000, 40, seed=0),
                                    write_population(users_1m, 1_000_000, 40, seed=100),
                                    write_population(users_10m, 10_000_000, 40, seed=200)))
        results["data_seconds"] = seconds
    if "fit" in chosen:
        results["fit"] = step_fit(workdir, trial)
        print("fit", results["fit"])
    if "fit_paths" in chosen:
        source = trial if fit_rows == 1_000_000 else workdir / f"trial-{fit_rows}.parquet"
        write_trial(source, fit_rows, 40, seed=0)
        results["fit_paths"] = step_fit_paths(workdir, source, baseline_src)
        print("fit_paths", results["fit_paths"])
    if "allocate" in chosen:
        results["allocate"] = {
            "streaming_1M": step_allocate(workdir, users_1m, 1_000_000, out="single-1m.parquet"),
            "streaming_10M": step_allocate(workdir, users_10m, 10_000_000, out="single-10m.parquet")}
        print("allocate", results["allocate"])
    if chosen & {"in_memory", "in_memory_10m"}:  # the previous path: whole file in memory
        sizes = {"1M": (users_1m, 1_000_000)} | ({"10M": (users_10m, 10_000_000)}
                                                if "in_memory_10m" in chosen else {})
        memory = {f"in_memory_{name}": step_in_memory(workdir, path, n, f"memory-{name}.parquet")
                  for name, (path, n) in sizes.items()}
        memory["identical"] = {f"streaming_vs_in_memory_{name}": same_bytes(
            workdir / f"single-{name.lower()}.parquet", workdir / f"memory-{name}.parquet") for name in sizes}
        results["in_memory"] = memory
        print("in_memory", memory)
    if "program" in chosen:
        sizes = cluster_sizes_of(workdir / "single-10m.parquet", k=int(json.loads(
            (workdir / "policy" / "manifest.json").read_text())["k"]))
        results["program"] = step_program(workdir, sizes, n_arms=5)
        print("program", results["program"])
    if "dask" in chosen:
        dask = {"processes_2_workers_1M": step_allocate(workdir, users_1m, 1_000_000, out="dask-1m.parquet",
                                                        extra=["--dask-address", "local"]),
                "processes_2_workers_10M": step_allocate(workdir, users_10m, 10_000_000,
                                                         out="dask-10m.parquet",
                                                         extra=["--dask-address", "local"]),
                "threads_2_workers_10M": step_dask_threads(workdir, users_10m, 10_000_000,
                                                           "dask-threads-10m.parquet")}
        dask["identical"] = {
            "dask_processes_vs_single_10M": same_bytes(workdir / "dask-10m.parquet", workdir / "single-10m.parquet"),
            "dask_threads_vs_single_10M": same_bytes(workdir / "dask-threads-10m.parquet",
                                                     workdir / "single-10m.parquet")}
        results["dask"] = dask
        print("dask", dask)
    results["targets"] = targets(results)
    write_json(results, reports / "scale.json")
    with atomic_path(reports / "scale.md") as tmp:
        tmp.write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    typer.run(main)
