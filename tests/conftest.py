"""Shared fixtures. Tests never need the network; Prefect runs in a temporary home."""

from __future__ import annotations

import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="budgetalloc-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from budgetalloc.params import SimulateParams  # noqa: E402
from budgetalloc.simulate import simulate_trial  # noqa: E402


@pytest.fixture(scope="session")
def small_world():
    """A 6,000-row binary trial with truth."""
    return simulate_trial(SimulateParams(n_users=6000), seed=11)


@pytest.fixture()
def rng():
    return np.random.default_rng(0)
