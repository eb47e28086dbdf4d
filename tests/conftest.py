"""Shared fixtures. Tests never need the network; Prefect runs in a temporary home."""

from __future__ import annotations

import os
import tempfile
import tracemalloc

# pytest-xdist workers inherit the controller's environment: each worker gets a home of its own
# (its own SQLite database and ephemeral server), never the one the controller set.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER or "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"budgetalloc-prefect-{_WORKER or 'main'}-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np
import pyarrow as pa
import pytest

from budgetalloc.params import SimulateParams
from budgetalloc.studies.simulate import simulate_trial

TINY_PARAMS = {
    "seed": 3,
    "train": {"hidden": 32, "head_hidden": 8, "epochs": 8, "batch_size": 512, "patience": 2},
    "cluster": {"k": 12, "n_init": 1},
    "distill": {"hidden": 32, "epochs": 8, "batch_size": 512},
    "statistics": {"n_scenarios": 10},
    "program": {"budget_levels": [0.05, 0.2, 0.5]},
}


#: The slowest modules, slowest first (seconds of a serial run): ``make test`` hands whole modules
#: to two pytest-xdist workers in collection order, so these start first and the short ones fill in
#: around them. The other modules keep their order after these.
SLOW_FIRST = (
    "test_flows.py",
    "test_dvc.py",
    "test_reliability.py",
    "test_hostile_outputs.py",
    "test_platform.py",
    "test_baselines.py",
    "test_sharding.py",
    "test_benchmark.py",
    "test_distributed.py",
    "test_representation.py",
    "test_fit_stream.py",
    "test_stages.py",
    "test_passes.py",
    "test_program.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order stays


@pytest.fixture(scope="session")
def tiny_fitted(tmp_path_factory):
    """A policy fitted on a 12,000-row trial with tiny params, saved; plus a population with truth."""
    from budgetalloc.data.contract import trial_from_frame
    from budgetalloc.fit.fit_stream import fit_policy
    from budgetalloc.params import params_from_dict
    from budgetalloc.policy import save_policy
    from budgetalloc.studies.simulate import simulate_population

    world = simulate_trial(SimulateParams(n_users=12_000), seed=1)
    params = params_from_dict(TINY_PARAMS)
    policy = fit_policy(trial_from_frame(world.frame, source="trial"), params)
    directory = tmp_path_factory.mktemp("policy") / "policy"
    save_policy(policy, directory)
    pop = simulate_population(SimulateParams(), seed=2, n_users=8000)
    return directory, pop, params


@pytest.fixture(scope="session")
def small_world():
    """A 6,000-row binary trial with truth."""
    return simulate_trial(SimulateParams(n_users=6000), seed=11)


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def peak_bytes(fn) -> int:
    """Peak of numpy/Python allocations (tracemalloc) plus Arrow's buffers (a fresh proxy pool)."""
    arrow, previous = pa.proxy_memory_pool(pa.default_memory_pool()), pa.default_memory_pool()
    pa.set_memory_pool(arrow)
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] + arrow.max_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)


@pytest.fixture(scope="session")
def app():
    """The ``budgetalloc`` command line, every command registered (as the console script runs it)."""
    from budgetalloc.cli.app import app as cli_app

    return cli_app
