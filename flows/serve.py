"""Serve the deployments of ``prefect.yaml`` (same flows, schedules and parameters), no work pool.

``prefect.yaml`` is the one place where the deployments are defined; this script
reads it and serves them from this process with ``prefect.serve``, so that the
schedules run without ``prefect deploy`` or a worker. It needs a Prefect server
(``prefect server start --host 127.0.0.1`` and ``PREFECT_API_URL``), and stops on Ctrl-C.

    python flows/serve.py
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron

ROOT = Path(__file__).resolve().parents[1]


def schedules_of(spec: dict) -> list:
    """The cron schedules of one deployment of prefect.yaml."""
    return [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
            for s in spec.get("schedules") or []]


def deployments(config: Path = ROOT / "prefect.yaml") -> list[RunnerDeployment]:
    """One runner deployment per deployment of ``config``, entrypoints relative to the repository."""
    specs = yaml.safe_load(config.read_text())["deployments"]
    out = []
    for spec in specs:
        flow = load_flow_from_entrypoint(str(ROOT / spec["entrypoint"]))
        out.append(flow.to_deployment(
            name=spec["name"],
            description=spec.get("description"),
            tags=spec.get("tags"),
            parameters=spec.get("parameters") or {},
            schedules=schedules_of(spec),
        ))
    return out


if __name__ == "__main__":
    os.chdir(ROOT)  # flow runs load their entrypoints relative to the repository
    serve(*deployments())
