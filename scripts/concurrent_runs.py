"""Both deployments at once against a real Prefect server: they must not collide.

In a throw-away copy of the repository (small params, ``scripts/local_prefect.py``)
this starts ``prefect server`` (127.0.0.1, a free port, SQLite in a temporary
``PREFECT_HOME``), creates the process work pool, runs ``prefect deploy --all``,
starts a worker, and triggers ``training/weekly-retraining`` and
``allocation/daily-allocation`` (``budget=25000``, a scenario of its own) within a
second of each other. It checks that:

1. both flow runs end Completed;
2. they did not run their DVC work at the same time: one run's log says it waited
   for the DVC workspace held by the other;
3. the scenario left ``params.yaml`` as it was, and both runs are DVC experiments.

Exit code 0 when every check holds, 1 otherwise. About 3 to 5 minutes on 2 cores.

    python scripts/concurrent_runs.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_prefect import BIN, background, copy_repository, env_for, prefect_server, sh

DEPLOYMENTS = {"training/weekly-retraining": {}, "allocation/daily-allocation": {"budget": 25000.0}}
WAITED = "waiting for the DVC workspace"


async def trigger_and_wait(timeout_s: float) -> list[dict]:
    """Create both flow runs back to back; wait for both to finish; their states, times and logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment

    runs, created = [], []
    for name, params in DEPLOYMENTS.items():
        runs.append(await run_deployment(name, parameters=params, timeout=0))
        created.append(time.monotonic())
    print(f"triggered {len(runs)} runs {created[-1] - created[0]:.2f} s apart", flush=True)
    deadline = time.monotonic() + timeout_s
    async with get_client() as client:
        while True:
            states = [(await client.read_flow_run(r.id)) for r in runs]
            if all(s.state.is_final() for s in states) or time.monotonic() > deadline:
                break
            await asyncio.sleep(3)
        out = []
        for name, fr in zip(DEPLOYMENTS, states, strict=True):
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])))
            out.append({"deployment": name, "flow_run": fr.name, "state": fr.state.name,
                        "start": fr.start_time.isoformat() if fr.start_time else None,
                        "end": fr.end_time.isoformat() if fr.end_time else None,
                        "waited": any(WAITED in log.message for log in logs),
                        "apart_s": round(created[-1] - created[0], 3)})
    return out


def experiments(repo: Path, env: dict) -> set[str]:
    shown = json.loads(sh(repo, sys.executable, "-m", "dvc", "exp", "show", "--json", env=env))
    return {rev["name"] for b in shown for exp in b.get("experiments") or [] for rev in exp["revs"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the runs")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="budgetalloc-concurrent-"))
    work.mkdir(parents=True, exist_ok=True)
    repo = copy_repository(work / "repo")
    params_before = (repo / "params.yaml").read_bytes()
    with prefect_server(work / "prefect-home", log=work / "server.log") as settings:
        env = env_for(repo, **settings, PWD=str(repo))
        prefect = str(BIN / "prefect")
        sh(repo, prefect, "work-pool", "create", "budgetalloc-process", "--type", "process", env=env)
        sh(repo, prefect, "--no-prompt", "deploy", "--all", env=env)
        with background([prefect, "worker", "start", "--pool", "budgetalloc-process"], cwd=repo, env=env,
                        log=work / "worker.log"):
            import os

            os.environ.update(settings)
            runs = asyncio.run(trigger_and_wait(args.timeout))
    checks = {
        "both runs Completed": all(r["state"] == "Completed" for r in runs),
        "triggered within a second": runs[0]["apart_s"] < 1.0,
        "one run waited for the other's DVC workspace": sum(r["waited"] for r in runs) == 1,
        "params.yaml unchanged by the scenario": (repo / "params.yaml").read_bytes() == params_before,
        "both runs are DVC experiments": len([e for e in experiments(repo, env_for(repo))
                                              if e.startswith(("train-", "alloc-"))]) >= 2,
    }
    for r in runs:
        print(json.dumps(r))
    for what, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    print(f"logs: {work}/server.log, {work}/worker.log")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
