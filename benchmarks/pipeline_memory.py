"""Peak memory of each DVC stage process of the pipeline on a large simulated Parquet trial.

Simulates a trial with 40 features (in chunks, written as Parquet row groups), then
runs every stage command of ``dvc.yaml`` in order, each as its own process in a
scratch directory, and records its peak resident set size (``wait4``'s
``ru_maxrss``), wall time and the load average. Writes ``reports/pipeline_memory.json``
and ``.md`` (the committed ones: 10M rows; ``reports/pipeline_memory_1m.*``: 1M rows).

    .venv/bin/python benchmarks/pipeline_memory.py [--rows 10000000] [--epochs 1] [--out reports/pipeline_memory_1m]

``--epochs`` caps the two networks' epochs so that a large trial fits in the time;
the caps that bound memory (``train.max_rows``, ``distill.max_rows``,
``data.preprocess_sample``, ``statistics.clip_sample``) stay at their defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from budgetalloc.params import SimulateParams
from budgetalloc.studies.simulate import simulate_population, simulate_trial

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 500_000
NOTE = ("`prepare` reads the raw trial in batches (it checks each batch and writes its rows to both parts as it "
        "reads); `train`, `cluster`, `distill` and `policy` read `prepared/fit.parquet` in batches, and `train` and "
        "`distill` hold the seeded samples their step learns from (each at most its cap, 1M rows by default); "
        "`evaluate` reads the test part in batches. "
        "Load: the 1-minute load average when the stage ended (the machine is shared).")


def write_trial(path: Path, rows: int, world: SimulateParams) -> None:
    """``rows`` simulated trial rows, simulated and written ``CHUNK`` at a time (distinct ids per chunk)."""
    writer = None
    for i, start in enumerate(range(0, rows, CHUNK)):
        frame = simulate_trial(world, seed=100 + i, n_users=min(CHUNK, rows - start)).frame
        frame["user_id"] = frame["user_id"].astype(str) + f"-{i}"
        table = pa.Table.from_pandas(frame, preserve_index=False)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=100_000)
    writer.close()


def run_stage(cmd: str, cwd: Path) -> dict:
    """Run one stage command; its exit status, peak RSS (MiB) and wall time (s)."""
    start = time.perf_counter()
    with open(cwd / "stage.log", "ab") as log:
        proc = subprocess.Popen(shlex.split(cmd), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "wall_s": round(time.perf_counter() - start, 1), "load_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--population", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default="reports/pipeline_memory")
    args = ap.parse_args()
    world = SimulateParams(n_features=40)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pipeline_memory_") as tmp:
        d = Path(tmp)
        for sub in ("data", "prepared", "models", "reports", "allocations"):
            (d / sub).mkdir()
        params = {"train": {"epochs": args.epochs}, "distill": {"epochs": args.epochs},
                  "allocate": {"users": "data/population.parquet"}}
        (d / "params.yaml").write_text(yaml.safe_dump(params))
        write_trial(d / "data" / "trial.parquet", args.rows, world)
        pop = simulate_population(world, seed=1, n_users=args.population).frame
        pq.write_table(pa.Table.from_pandas(pop, preserve_index=False), d / "data" / "population.parquet")
        for name, stage in stages.items():
            cmd = stage["cmd"].replace("data/trial.csv", "data/trial.parquet")
            cmd = cmd.replace("python ", f"{sys.executable} ", 1)
            results[name] = run_stage(cmd, d)
            print(name, results[name], flush=True)
            if results[name]["rc"]:
                print((d / "stage.log").read_text()[-3000:])
                sys.exit(1)
    report = {"rows": args.rows, "features": 40, "population": args.population, "epochs": args.epochs,
              "cores": os.cpu_count(), "stages": results}
    out = ROOT / args.out
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Peak memory per DVC stage process ({args.rows:,} trial rows, 40 features)", "",
             (f"`benchmarks/pipeline_memory.py --rows {args.rows} --epochs {args.epochs}`; population "
              f"{args.population:,} users; {os.cpu_count()} cores (shared). Peak RSS of each stage process "
              "(`wait4` ru_maxrss)."), "", "| stage | peak RSS (MiB) | wall (s) | load |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {r['peak_rss_mib']:,.0f} | {r['wall_s']:,.0f} | {r['load_1m']:.1f} |"
              for name, r in results.items()]
    lines += ["", NOTE]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
