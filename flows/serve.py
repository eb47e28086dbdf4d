"""Serve the deployments of ``prefect.yaml`` (same flows, schedules and parameters), no work pool.

``prefect.yaml`` is the one place where the deployments are defined; this script
reads it and serves them from this process with ``prefect.serve``, so that the
schedules run without ``prefect deploy`` or a worker. It needs a Prefect server
(``prefect server start --host 127.0.0.1`` and ``PREFECT_API_URL``), and stops on Ctrl-C.

The served deployments have their own names (``NAME-served``: ``training/weekly-retraining-served``),
so serving never re-registers, pauses or deletes what ``prefect deploy`` made, and
``prefect deploy`` never takes these. Use one or the other: the script refuses to
start while a ``prefect deploy`` deployment of the same schedule is active (the
schedule would run twice), and says how to pause it.

    python -m flows.serve
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml
from prefect import serve
from prefect.client.orchestration import get_client
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = "-served"


def schedules_of(spec: dict) -> list:
    """The cron schedules of one deployment of prefect.yaml."""
    return [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
            for s in spec.get("schedules") or []]


def specs(config: Path = ROOT / "prefect.yaml") -> list[dict]:
    """The deployments of ``config``."""
    return yaml.safe_load(config.read_text())["deployments"]


def deployments(config: Path = ROOT / "prefect.yaml") -> list[RunnerDeployment]:
    """One runner deployment per deployment of ``config`` (named ``NAME-served``), entrypoints
    relative to the repository."""
    out = []
    for spec in specs(config):
        flow = load_flow_from_entrypoint(str(ROOT / spec["entrypoint"]))
        out.append(flow.to_deployment(
            name=spec["name"] + SUFFIX,
            description=spec.get("description"),
            tags=spec.get("tags"),
            parameters=spec.get("parameters") or {},
            schedules=schedules_of(spec),
        ))
    return out


def active_deployed(served: list[RunnerDeployment]) -> list[str]:
    """The ``prefect deploy`` deployments (``FLOW/NAME``) of these schedules that are active on the server."""
    found = []
    with get_client(sync_client=True) as client:
        for d in served:
            name = f"{d.flow_name}/{d.name.removesuffix(SUFFIX)}"
            try:
                deployed = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if not deployed.paused and any(s.active for s in deployed.schedules):
                found.append(name)
    return found


def guard(served: list[RunnerDeployment]) -> str | None:
    """Why serving must not start (the schedules are already deployed and active), or ``None``."""
    clash = active_deployed([d for d in served if d.schedules])
    if not clash:
        return None
    pause = "; ".join(f"prefect deployment schedule pause {name} --all" for name in clash)
    return (f"error: {', '.join(clash)} already run these schedules through a work pool (prefect deploy); "
            f"serving them too would run each schedule twice. Use the worker, or pause them first: {pause}")


if __name__ == "__main__":
    os.chdir(ROOT)  # flow runs load their entrypoints relative to the repository
    served = deployments()
    problem = guard(served)
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)
    serve(*served)
