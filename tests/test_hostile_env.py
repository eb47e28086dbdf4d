"""Faults of the environment: a full disk, a read-only or immutable folder, a parent that is a file,
an out that is a directory, a name too long, an unreachable scheduler. Each is one line naming the
path or address, exit 2, no traceback, and nothing left behind (no temporary, no empty directory).

The full and read-only disks are small tmpfs mounts where this machine allows them (root in a
container usually does); otherwise the fault is injected as the errno the kernel would give."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TINY_PARAMS
from test_reliability import error_line, one_error_line
from typer.testing import CliRunner

from budgetalloc.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_fitted):
    import yaml

    from budgetalloc.studies.simulate import SimulateParams, simulate_trial

    root = tmp_path_factory.mktemp("env")
    policy_dir, pop, _ = tiny_fitted
    simulate_trial(SimulateParams(n_users=1500), seed=4).frame.to_parquet(root / "trial.parquet")
    pop.frame.iloc[:300].to_parquet(root / "pop.parquet")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return root, policy_dir


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, check=False, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False, timeout=20)


def _fill(path: Path) -> None:
    """Fill a filesystem to the last byte."""
    with open(path / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    try:
        with open(path / "filler", "ab") as fh:
            while True:
                fh.write(b"\0")
                fh.flush()
    except OSError:
        pass


@pytest.fixture()
def full_disk(tmp_path, monkeypatch):
    """A directory on a full filesystem (tmpfs), or one where every write fails with ENOSPC."""
    path = tmp_path / "full"
    if _mount(path, "size=512k,mode=0777"):
        _fill(path)
        yield path
        _umount(path)
        return
    from budgetalloc import files

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", no_space)
    yield path


@pytest.fixture()
def read_only(tmp_path, monkeypatch):
    """A directory on a read-only filesystem, or one where every write fails with EROFS."""
    path = tmp_path / "ro"
    if _mount(path, "size=64k,ro"):
        yield path
        _umount(path)
        return
    from budgetalloc import files

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(files, "make_parents", refuse)
    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(files.tempfile, "mkdtemp", refuse)
    yield path


def _left(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def _commands(root: Path, policy: Path, where: Path) -> dict[str, list[str]]:
    return {
        "allocate": ["allocate", "--policy", str(policy), "--users", str(root / "pop.parquet"), "--budget", "20",
                     "--out", str(where / "a.parquet")],
        "allocate-csv": ["allocate", "--policy", str(policy), "--users", str(root / "pop.parquet"),
                         "--budget", "20", "--out", str(where / "sub" / "a.csv")],
        "simulate": ["simulate", "--out", str(where / "t.parquet"), "--population", str(where / "p.parquet"),
                     "--n-users", "500", "--population-size", "300"],
        "evaluate": ["evaluate", "--policy", str(policy), "--data", str(root / "trial.parquet"),
                     "--out", str(where / "eval")],
        "fit": ["fit", "--data", str(root / "trial.parquet"), "--out", str(where / "policy"),
                "--params", str(root / "params.yaml")],
    }


@pytest.mark.parametrize("command", ["allocate", "allocate-csv", "simulate", "evaluate", "fit"])
def test_full_disk_is_one_line_and_leaves_nothing(world, full_disk, command):
    root, policy = world
    before = _left(full_disk)
    args = _commands(root, policy, full_disk)[command]
    line = error_line(runner.invoke(app, args))
    assert "No space left on device" in line and str(full_disk) in line, line
    assert ".tmp" not in line, line  # the output is named, not a temporary
    assert _left(full_disk) == before, "a temporary, a partial output or an empty directory was left"


@pytest.mark.parametrize("command", ["allocate", "allocate-csv", "simulate", "evaluate", "fit"])
def test_read_only_folder_is_one_line(world, read_only, command):
    root, policy = world
    args = _commands(root, policy, read_only)[command]
    line = one_error_line(runner.invoke(app, args))
    assert "Read-only file system" in line and str(read_only) in line, line
    assert _left(read_only) == []


def _chattr(flag: str, path: Path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True, check=False,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_immutable_folder_is_one_line(world, tmp_path):
    """Root ignores permission bits; an immutable directory refuses it too."""
    root, policy = world
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _chattr("+i", locked):
        pytest.skip("chattr +i is not available here")
    try:
        for command in ("allocate", "fit"):
            line = one_error_line(runner.invoke(app, _commands(root, policy, locked)[command]))
            assert "Operation not permitted" in line and str(locked) in line, line
        assert _left(locked) == []
    finally:
        _chattr("-i", locked)


def test_paths_that_cannot_hold_an_output(world, tmp_path):
    root, policy = world
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = {
        str(tmp_path / "file.txt" / "a.parquet"): "not a directory",
        str(tmp_path / "file.txt" / "deeper" / "a.parquet"): "not a directory",
        str(tmp_path / "adir"): "is a directory",
        str(tmp_path / ("x" * 300 + ".parquet")): "too long",
    }
    for out, message in cases.items():
        res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(root / "pop.parquet"),
                                  "--budget", "5", "--out", out])
        line = one_error_line(res)
        assert message in line.lower(), (out, line)
    res = runner.invoke(app, ["evaluate", "--policy", str(policy), "--data", str(root / "trial.parquet"),
                              "--out", str(tmp_path / "file.txt")])
    assert "not a directory" in one_error_line(res).lower()
    assert (tmp_path / "file.txt").read_text() == "x"
    assert _left(tmp_path) == ["adir", "file.txt"] and _left(tmp_path / "adir") == []


def test_inputs_that_are_not_files(world, tmp_path):
    root, policy = world
    for users in ("/dev/zero", str(tmp_path)):
        res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", users, "--budget", "5",
                                  "--out", str(tmp_path / "a.parquet")])
        assert "not a file" in one_error_line(res)
    res = runner.invoke(app, ["allocate", "--policy", str(root / "pop.parquet"), "--users",
                              str(root / "pop.parquet"), "--budget", "5", "--out", str(tmp_path / "a.parquet")])
    assert "policy directory not found" in one_error_line(res)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address,message", [
    (f"tcp://127.0.0.1:{_closed_port()}", "cannot reach the Dask scheduler"),
    ("tcp://127.0.0.1", "expected 'local' or tcp://HOST:PORT"),
    ("tcp://127.0.0.1:notaport", "expected 'local' or tcp://HOST:PORT"),
], ids=["closed-port", "no-port", "bad-port"])  # the same ids in every xdist worker (the port is drawn)
def test_unreachable_dask_address_is_one_line_and_fast(world, tmp_path, address, message):
    root, policy = world
    started = time.monotonic()
    res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(root / "pop.parquet"),
                              "--budget", "5", "--out", str(tmp_path / "a.parquet"), "--dask-address", address])
    line = one_error_line(res)
    assert message in line and address in line, line
    assert time.monotonic() - started < 15
    assert not (tmp_path / "a.parquet").exists()


def test_os_errors_of_any_command_are_one_line(world, tmp_path, monkeypatch):
    """The rule is the CLI's, not each command's: an OSError raised anywhere inside one is one line."""
    root, _ = world
    from budgetalloc import commands

    def broken(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/where")

    monkeypatch.setattr(commands, "load_params", broken)
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "t.parquet")])
    assert one_error_line(res) == "error: /some/where: Permission denied"
    monkeypatch.setattr(os, "getcwd", lambda: (_ for _ in ()).throw(FileNotFoundError(errno.ENOENT, "gone")))
    res = runner.invoke(app, ["fit", "--data", str(root / "trial.parquet"), "--out", "."])
    one_error_line(res)
