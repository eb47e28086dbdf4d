"""Hostile output paths: `fit --out` replaces only a policy; outputs never coincide with inputs or
land inside a policy; temporaries are literal names, locked by their run; concurrent writers each
end cleanly (last writer wins); created files follow the umask or the mode they replace."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import TINY_PARAMS
from test_reliability import one_error_line
from typer.testing import CliRunner

from budgetalloc.cli.app import app
from budgetalloc.files import atomic_path, claim_temp, remove_stale, write_table
from budgetalloc.policy import load_policy, save_policy

runner = CliRunner()
BIN = Path(sys.executable).parent / "budgetalloc"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_fitted):
    import yaml

    from budgetalloc.studies.simulate import SimulateParams, simulate_trial

    root = tmp_path_factory.mktemp("outputs")
    policy_dir, pop, _ = tiny_fitted
    simulate_trial(SimulateParams(n_users=1500), seed=4).frame.to_parquet(root / "trial.parquet")
    pop.frame.iloc[:300].to_parquet(root / "pop.parquet")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return root, policy_dir


def _fit(root: Path, out, cwd=None):
    args = ["fit", "--data", str(root / "trial.parquet"), "--out", str(out), "--params", str(root / "params.yaml")]
    if cwd is None:
        return runner.invoke(app, args)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, args)
    finally:
        os.chdir(old)


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- fit --out replaces only a policy ------------------------------------------------------


def test_fit_refuses_a_users_directory_and_keeps_every_file(world, tmp_path):
    root, _ = world
    mine = tmp_path / "photos"
    (mine / "2024").mkdir(parents=True)
    (mine / "2024" / "a.jpg").write_bytes(b"\xff\xd8 precious")
    (mine / "notes.txt").write_text("keep me")
    before = _tree(mine)
    line = one_error_line(_fit(root, mine))
    assert str(mine) in line and "not a policy" in line
    assert _tree(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no temporaries left


def test_fit_refuses_its_own_input_file_as_out(world, tmp_path):
    root, _ = world
    trial = tmp_path / "t.parquet"
    shutil.copy(root / "trial.parquet", trial)
    before = trial.read_bytes()
    res = runner.invoke(app, ["fit", "--data", str(trial), "--out", str(trial), "--params",
                              str(root / "params.yaml")])
    assert str(trial) in one_error_line(res)
    assert trial.read_bytes() == before


@pytest.mark.parametrize("out", [".", "..", "./", "sub/.."])
def test_fit_refuses_the_current_directory(world, tmp_path, out):
    root, _ = world
    work = tmp_path / "a" / "b"
    (work / "sub").mkdir(parents=True)
    (work / "mine.txt").write_text("x")
    line = one_error_line(_fit(root, out, cwd=work))
    assert "refusing" in line
    assert (work / "mine.txt").read_text() == "x"


def test_fit_refuses_a_file_a_symlink_and_an_empty_directory(world, tmp_path):
    root, policy = world
    (tmp_path / "file.txt").write_text("data")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(policy, target_is_directory=True)
    for name in ("file.txt", "empty", "link"):
        assert "refusing to replace" in one_error_line(_fit(root, tmp_path / name)), name
    assert (tmp_path / "file.txt").read_text() == "data" and (tmp_path / "empty").is_dir()
    assert (tmp_path / "link").is_symlink()
    load_policy(policy)  # the link's target is untouched


def test_fit_refuses_a_policy_that_holds_a_users_file(world, tmp_path):
    root, policy = world
    copy = tmp_path / "policy"
    shutil.copytree(policy, copy)
    (copy / "my_notes.md").write_text("mine")
    line = one_error_line(_fit(root, copy))
    assert "my_notes.md" in line
    assert (copy / "my_notes.md").read_text() == "mine"


def test_save_policy_replaces_a_policy_and_a_missing_path(world, tmp_path):
    _, policy_dir = world
    policy = load_policy(policy_dir)
    target = tmp_path / "deep" / "er" / "policy"
    save_policy(policy, target)
    save_policy(policy, target)  # a policy is replaced
    assert _tree(target) == _tree(policy_dir)
    assert sorted(p.name for p in target.parent.iterdir()) == ["policy"]


@pytest.mark.parametrize("name", ["pol[1]", "pol*", "pol?", "-pol", "pol with space", "pöl\u00e9"])
def test_odd_output_names_are_literal(world, tmp_path, name):
    _, policy_dir = world
    policy = load_policy(policy_dir)
    decoy = tmp_path / ".pol1.abcdefgh.tmp"  # another target's temporary, unlocked: a glob of 'pol[1]' matches it
    decoy.write_text("other run")
    save_policy(policy, tmp_path / name)
    load_policy(tmp_path / name)
    assert decoy.read_text() == "other run"


# -- outputs that are inputs or lie inside a policy ----------------------------------------


def test_allocate_refuses_out_equal_to_users(world, tmp_path):
    root, policy = world
    users = tmp_path / "pop.parquet"
    shutil.copy(root / "pop.parquet", users)
    before = users.read_bytes()
    res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(users), "--budget", "5",
                              "--out", str(users)])
    assert "--users" in one_error_line(res)
    assert users.read_bytes() == before
    os.link(users, tmp_path / "hard.parquet")  # the same file under another name
    res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(users), "--budget", "5",
                              "--out", str(tmp_path / "hard.parquet")])
    assert "--users" in one_error_line(res)
    assert users.read_bytes() == before


def test_outputs_inside_a_policy_are_refused(world, tmp_path):
    root, policy = world
    copy = tmp_path / "policy"
    shutil.copytree(policy, copy)
    res = runner.invoke(app, ["evaluate", "--policy", str(copy), "--data", str(root / "trial.parquet"),
                              "--out", str(copy)])
    assert "policy directory" in one_error_line(res)
    res = runner.invoke(app, ["allocate", "--policy", str(copy), "--users", str(root / "pop.parquet"),
                              "--budget", "5", "--out", str(copy / "alloc.parquet")])
    assert "policy directory" in one_error_line(res)
    load_policy(copy)


def test_simulate_refuses_two_outputs_at_one_path(tmp_path):
    out = tmp_path / "t.parquet"
    res = runner.invoke(app, ["simulate", "--out", str(out), "--population", str(out), "--n-users", "500",
                              "--population-size", "200"])
    assert "--out" in one_error_line(res)
    assert not out.exists()


# -- temporaries ---------------------------------------------------------------------------


def test_stale_cleanup_keeps_a_live_runs_temporary_and_removes_a_dead_ones(tmp_path):
    target = tmp_path / "a.parquet"
    live, fd = claim_temp(target, ".tmp", directory=False)
    dead = tmp_path / ".a.parquet.zzzzzzzz.tmp"
    dead.write_text("left by a killed run")
    dead_dir = tmp_path / ".a.parquet.yyyyyyyy.parts"
    (dead_dir / "x").mkdir(parents=True)
    other = tmp_path / ".a.parquet.backup.tmp"  # not a temporary's name: a user's file
    other.write_text("mine")
    try:
        remove_stale(target)
        assert live.exists() and not dead.exists() and not dead_dir.exists() and other.exists()
    finally:
        os.close(fd)
    remove_stale(target)
    assert not live.exists()


def test_stale_cleanup_follows_no_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".a.parquet.abcdefgh.tmp").symlink_to(outside, target_is_directory=True)
    write_table(pd.DataFrame({"a": [1]}), tmp_path / "out" / "a.parquet")
    assert (outside / "keep.txt").read_text() == "x"


def test_concurrent_writers_in_threads_all_end_cleanly(tmp_path):
    target = tmp_path / "t.parquet"
    frames = [pd.DataFrame({"writer": [i] * 1000, "v": range(1000)}) for i in range(8)]
    errors = []

    def write(frame):
        try:
            for _ in range(5):
                write_table(frame, target)
        except Exception as err:  # noqa: BLE001 - collected and asserted on
            errors.append(err)

    threads = [threading.Thread(target=write, args=(f,)) for f in frames]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = pd.read_parquet(target)
    assert got["writer"].nunique() == 1 and len(got) == 1000  # one writer's complete file
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_concurrent_policy_writers_last_one_wins(world, tmp_path):
    _, policy_dir = world
    policy = load_policy(policy_dir)
    target = tmp_path / "policy"
    errors = []

    def write():
        try:
            for _ in range(3):
                save_policy(policy, target)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    load_policy(target)
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]


@pytest.mark.slow
def test_two_allocate_processes_to_one_out_both_succeed(world, tmp_path):
    root, policy = world
    out = tmp_path / "a.parquet"
    args = [str(BIN), "allocate", "--policy", str(policy), "--users", str(root / "pop.parquet"), "--budget", "20",
            "--out", str(out)]
    for _ in range(3):
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
        for stdout, stderr, code in results:
            assert code == 0 and "Traceback" not in stderr, stderr
        assert len(pq.read_table(out)) == 300
        assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]


# -- modes ---------------------------------------------------------------------------------


def test_outputs_follow_the_umask_and_keep_a_replaced_files_mode(world, tmp_path):
    _, policy_dir = world
    old = os.umask(0o022)
    try:
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "new.parquet")
        assert stat.S_IMODE((tmp_path / "new.parquet").stat().st_mode) == 0o644
        save_policy(load_policy(policy_dir), tmp_path / "policy")
        assert stat.S_IMODE((tmp_path / "policy").stat().st_mode) == 0o755
        modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "policy").rglob("*")}
        assert modes <= {0o644, 0o755}
        (tmp_path / "kept.csv").write_text("a\n0\n")
        os.chmod(tmp_path / "kept.csv", 0o640)
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "kept.csv")
        assert stat.S_IMODE((tmp_path / "kept.csv").stat().st_mode) == 0o640
        os.umask(0o077)
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "private.parquet")
        assert stat.S_IMODE((tmp_path / "private.parquet").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_failed_write_removes_the_directories_it_made(tmp_path):
    target = tmp_path / "new" / "deeper" / "a.parquet"
    with pytest.raises(RuntimeError), atomic_path(target):
        raise RuntimeError("fails mid-way")
    assert list(tmp_path.iterdir()) == []


def test_import_and_abtest_refuse_to_overwrite_their_input(tmp_path):
    src = tmp_path / "hillstrom.csv"
    src.write_bytes((Path(__file__).parent / "fixtures" / "hillstrom_sample.csv").read_bytes())
    before = src.read_bytes()
    res = runner.invoke(app, ["data", "import", "hillstrom", str(src), "--out", str(src)])
    assert "--src" in one_error_line(res)
    logged = tmp_path / "logged.csv"
    logged.write_text("group,orders,gmv,cost\na,1,10,1\nb,0,0,0\na,0,0,0\nb,2,20,2\n")
    res = runner.invoke(app, ["abtest", "--data", str(logged), "--out", str(logged)])
    assert "--data" in one_error_line(res)
    assert src.read_bytes() == before and logged.read_text().startswith("group,orders")


def test_a_pipe_or_device_at_out_is_not_replaced(world, tmp_path):
    root, policy = world
    fifo = tmp_path / "a.parquet"
    os.mkfifo(fifo)
    res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(root / "pop.parquet"),
                              "--budget", "5", "--out", str(fifo)])
    assert "not a file" in one_error_line(res)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_the_longest_allowed_name_is_written(world, tmp_path):
    """A 255-byte name is valid; its temporary's name must be too."""
    name = "n" * 247 + ".parquet"
    write_table(pd.DataFrame({"a": [1]}), tmp_path / name)
    save_policy(load_policy(world[1]), tmp_path / ("p" * 255))
    assert sorted(len(p.name) for p in tmp_path.iterdir()) == [255, 255]


def test_a_symlink_at_out_is_replaced_as_a_name_not_followed(world, tmp_path):
    target = tmp_path / "theirs.csv"
    target.write_text("not ours\n")
    (tmp_path / "a.csv").symlink_to(target)
    write_table(pd.DataFrame({"a": [1]}), tmp_path / "a.csv")
    assert target.read_text() == "not ours\n" and not (tmp_path / "a.csv").is_symlink()


def test_a_temporary_is_kept_while_its_process_lives_and_removed_after_kill_9(tmp_path):
    import signal

    target = tmp_path / "a.parquet"
    code = ("import sys, time; from pathlib import Path; from budgetalloc.files import claim_temp; "
            f"tmp, fd = claim_temp(Path({str(target)!r}), '.tmp', directory=False); print(tmp, flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.exists()
        write_table(pd.DataFrame({"a": [1]}), target)  # another run's clean-up keeps the live temporary
        assert tmp.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    write_table(pd.DataFrame({"a": [2]}), target)  # the killed run's temporary goes
    assert not tmp.exists() and [p.name for p in tmp_path.iterdir()] == ["a.parquet"]
