"""What each CLI command does, as plain functions (the CLI only parses and prints)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from budgetalloc.data.contract import arm_summary, load_trial, trial_from_frame
from budgetalloc.files import check_distinct, probe_writable, write_tables
from budgetalloc.params import load_params, with_overrides
from budgetalloc.studies.simulate import simulate_population, simulate_trial, truth_frame


def run_simulate(
    *,
    out: Path,
    population: Path | None,
    truth: Path | None,
    population_size: int,
    params_path: Path | None,
    seed: int | None,
    overrides: dict,
) -> pd.DataFrame:
    """Simulate a trial (and optionally a population with its truth); return the arm summary."""
    params = with_overrides(
        load_params(params_path), {f"simulate.{k}": v for k, v in overrides.items()} | {"seed": seed}
    )
    sim, seed = params.simulate, params.seed
    targets = [out] + ([population] + ([truth] if truth is not None else []) if population is not None else [])
    for i, path in enumerate(targets[1:], start=1):
        check_distinct(path, **{name: other for name, other in zip(("out", "population"), targets[:i])})
    world = simulate_trial(sim, seed=seed)
    frames = [world.frame]
    if population is not None:
        pop = simulate_population(sim, seed=seed + 1, n_users=population_size)
        frames.append(pop.frame)
        if truth is not None:
            frames.append(truth_frame(pop))
    write_tables(dict(zip(targets, frames)))
    return arm_summary(trial_from_frame(world.frame, source=str(out)))


def fit_path(data: Path, params, stream: bool | None) -> str:
    """``"streamed"`` or ``"in memory"``: how ``fit`` reads this trial file.

    A Parquet trial with more than ``data.stream_rows`` rows (from its metadata) is
    streamed (:func:`budgetalloc.fit.fit_stream.fit_policy_file`); smaller ones and CSV
    are loaded whole. ``stream`` forces one or the other (streaming needs Parquet).
    """
    from budgetalloc.errors import DataError
    from budgetalloc.fit.trial_scan import parquet_rows

    if stream is False:
        return "in memory"
    rows = parquet_rows(data)
    if rows is None:
        if stream:
            raise DataError(f"{data}: the streamed fit reads Parquet files only (convert it, or leave out --stream)")
        return "in memory"
    return "streamed" if stream or rows > params.data.stream_rows else "in memory"


def run_fit(*, data: Path, out: Path, params_path: Path | None, reporter=None, stream: bool | None = None) -> dict:
    """Validate the trial, fit every stage, write the policy atomically; return its summary.

    The trial is streamed or loaded whole as :func:`fit_path` decides; the summary's
    ``fit_path`` says which.
    """
    from budgetalloc.fit.fit_stream import fit_policy, fit_policy_file
    from budgetalloc.policy import check_policy_target, save_policy

    check_distinct(out, data=data)
    check_policy_target(out)  # before the fit, not minutes later
    probe_writable(out)
    params = load_params(params_path)
    if fit_path(data, params, stream) == "streamed":
        policy = fit_policy_file(data, params, reporter)
    else:
        policy = fit_policy(load_trial(data, features=params.data.features), params, reporter)
    save_policy(policy, out)
    return policy.summary


def run_allocate(*, policy_dir: Path, users: Path, budget, out: Path, dask_address: str | None = None,
                 partitions: int | None = None):
    """Allocate a population file under a total budget, streamed; write the allocation atomically.

    The file is read in batches (:func:`budgetalloc.serve.allocate.allocate_file`), so memory
    does not grow with its width. With ``dask_address`` the partition-parallel passes run on Dask
    instead (:func:`budgetalloc.serve.allocate.allocate_distributed`): ``"local"`` on a new
    LocalCluster, otherwise on the Dask scheduler at that address. Both write the rows
    :func:`budgetalloc.serve.allocate.allocate_population` gives, and return a
    :class:`budgetalloc.serve.allocate.Allocation`.
    """
    from budgetalloc.errors import BudgetallocError
    from budgetalloc.policy import check_not_policy_output, load_policy
    from budgetalloc.serve.allocate import allocate_distributed, allocate_file, check_budget

    budget = check_budget(budget)
    check_distinct(out, users=users)
    check_not_policy_output(out)
    if dask_address is not None:
        check_reachable(dask_address)
        return allocate_distributed(policy_dir, users, budget, out, address=dask_address, partitions=partitions,
                                    quiet=True)
    if partitions is not None:
        raise BudgetallocError("--partitions applies to the Dask path: add --dask-address local (or an address)")
    return allocate_file(load_policy(policy_dir), users, budget, out)


def run_evaluate(*, policy_dir: Path, data: Path, out: Path, batch_size: int | None = None) -> dict:
    """Evaluate a policy on a held-out trial file, streamed; write metrics.json, curve.json, curve.png.

    The file is read in batches (:func:`budgetalloc.serve.evaluate.evaluate_file`), so
    memory does not grow with its width; the reports are those of the whole file in
    memory (:func:`budgetalloc.serve.evaluate.evaluate_policy`).
    """
    from budgetalloc.policy import check_not_policy_output, load_policy
    from budgetalloc.serve.evaluate import evaluate_file

    check_not_policy_output(out / "metrics.json")
    return evaluate_file(load_policy(policy_dir), data, out, batch_size=batch_size)


def check_reachable(address: str, *, timeout: float = 5.0) -> None:
    """A Dask scheduler address that accepts a TCP connection (``local`` and other schemes are not probed).

    Raises:
        OSError: naming the address, after at most ``timeout`` seconds.
    """
    import socket
    from urllib.parse import urlsplit

    if address == "local":
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if parts.scheme not in ("tcp", "tls"):
        return  # inproc://, ucx://, ...: Dask's own connection reports them
    if not host or port is None:
        from budgetalloc.errors import BudgetallocError

        raise BudgetallocError(f"--dask-address {address!r}: expected 'local' or tcp://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        reason = "connection timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise OSError(err.errno, f"cannot reach the Dask scheduler ({reason})", address) from None
