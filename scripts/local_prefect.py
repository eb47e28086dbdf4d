"""A throw-away copy of the repository and a real local Prefect server, for the scripts here.

``copy_repository`` copies what git tracks or would track (not data/, models/,
caches), optionally with small params, simulates ``data/`` and commits it, so a
script can run flows, deployments and DVC there without touching this checkout.
``prefect_server`` starts ``prefect server start --host 127.0.0.1`` on a free port
with its own ``PREFECT_HOME`` (SQLite in a temporary directory); ``background``
starts a worker or any other long command. Everything is stopped with SIGINT
(workers and servers may ignore SIGTERM), the server last.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Small params: the whole pipeline in about a minute on 2 cores (the tests use the same).
TINY = {
    "seed": 3,
    "simulate": {"n_users": 8000},
    "train": {"hidden": 32, "head_hidden": 8, "epochs": 8, "batch_size": 512, "patience": 2},
    "cluster": {"k": 12, "n_init": 1},
    "distill": {"hidden": 32, "epochs": 8, "batch_size": 512},
    "statistics": {"n_scenarios": 10},
    "program": {"budget_levels": [0.05, 0.2, 0.5]},
    "allocate": {"budget": 150.0},
}
TINY_POPULATION = 1500


def env_for(repo: Path, **extra: str) -> dict[str, str]:
    """The environment of a command in the copy: this venv first on PATH, the copy's own sources."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(repo / "src"), str(repo)])
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    env.update(extra)
    return env


def sh(repo: Path, *args: str, env: dict | None = None) -> str:
    """Run a command in ``repo``; its output. Raises with the output's tail when it fails."""
    res = subprocess.run(args, cwd=repo, env=env or env_for(repo), capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def copy_repository(dst: Path, params: dict | None = TINY, *, population: int = TINY_POPULATION) -> Path:
    """A committed copy of the working tree, with ``params`` merged into params.yaml and fresh data/.

    ``params=None`` keeps params.yaml (and data/ then matches the committed data.dvc).
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    args = []
    if params is not None:
        merged = yaml.safe_load((dst / "params.yaml").read_text())
        for key, value in params.items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
        (dst / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
        (dst / "data.dvc").unlink(missing_ok=True)
        args = ["--population-size", str(population)]
    sh(dst, "git", "init", "-q")
    sh(dst, sys.executable, "-m", "budgetalloc.stages.simulate", *args)
    sh(dst, "git", "add", "-A")
    sh(dst, "git", "-c", "user.name=budgetalloc", "-c", "user.email=budgetalloc@localhost", "commit", "-qm", "copy")
    return dst


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until the server at ``url`` (``.../api``) answers its health check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("prefect server exited")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"no Prefect server at {url}")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT, then kill if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def background(cmd: list[str], *, cwd: Path, env: dict, log: Path) -> Iterator[subprocess.Popen]:
    """A long-running command (a worker, serve) with its output in ``log``; stopped on exit."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            stop(proc)


@contextmanager
def prefect_server(home: Path, *, log: Path) -> Iterator[dict[str, str]]:
    """A local Prefect server (127.0.0.1, free port, SQLite under ``home``); yields the clients' settings."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    settings = {"PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1"}
    env = {**os.environ, **settings}
    env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
    with background([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    cwd=home, env=env, log=log) as server:
        wait_healthy(url, server)
        yield settings
