"""Data-parallel training over several devices (faked on the CPU) in ``nn.fit``.

XLA fixes the number of CPU devices when JAX starts, so every run happens in a fresh
process with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (or without it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from budgetalloc.models import nn

# Trains the representation network on a small simulated trial and prints what it
# saw: how the first epoch's inputs were placed, whether its compiled program
# all-reduces, and the resulting losses and weights' hash.
SCRIPT = """
import hashlib, json, sys
import flax.serialization, jax, numpy as np
from flax import nnx
from budgetalloc.models import nn
from budgetalloc.data.contract import trial_from_frame
from budgetalloc.params import SimulateParams, TrainParams
from budgetalloc.models.representation import train_representation
from budgetalloc.studies.simulate import simulate_trial

seen = {}
make_train_epoch = nn.make_train_epoch

def recording_make_train_epoch(graphdef, loss_fn, tx, mesh=None):
    train_epoch = make_train_epoch(graphdef, loss_fn, tx, mesh)

    def recorded(state, data, idx, valid):
        if not seen:
            leaf = jax.tree.leaves(state)[0]
            seen["state_devices"] = len(leaf.sharding.device_set)
            seen["state_replicated"] = leaf.sharding.is_fully_replicated
            sharding = getattr(idx, "sharding", None)  # numpy on one device
            seen["idx_devices"] = 1 if sharding is None else len(sharding.device_set)
            seen["idx_spec"] = None if sharding is None else list(sharding.spec)
            seen["batch_rows"] = idx.shape[1]
            hlo = train_epoch.lower(state, data, idx, valid).compile().as_text()
            seen["all_reduce"] = "all-reduce" in hlo
        return train_epoch(state, data, idx, valid)

    return recorded

nn.make_train_epoch = recording_make_train_epoch
trial = trial_from_frame(simulate_trial(SimulateParams(n_users=6000), seed=1).frame, source="t")
X = trial.X.astype(np.float32)
X = (X - X.mean(0)) / X.std(0)
params = TrainParams(hidden=32, head_hidden=8, epochs=6, batch_size=int(sys.argv[1]), patience=6)
model = train_representation(
    X, trial.treatment, trial.response, trial.cost, trial.ipw,
    n_arms=trial.n_arms, binary_response=trial.binary_response, params=params, seed=3,
)
mesh = nn.data_parallel_mesh()
weights = flax.serialization.to_bytes(jax.tree.map(np.asarray, nnx.to_pure_dict(model.params)))
print(json.dumps({
    **seen,
    "devices": len(jax.devices()),
    "mesh_size": None if mesh is None else mesh.size,
    "params_devices": len(jax.tree.leaves(model.params)[0].sharding.device_set),
    "val_loss": model.history.val_loss,
    "sha256": hashlib.sha256(weights).hexdigest(),
}))
"""


def _train(*, devices: int, batch_size: int, data_parallel: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", nn.DATA_PARALLEL_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if data_parallel is not None:
        env[nn.DATA_PARALLEL_ENV] = data_parallel
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(batch_size)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    """One device; four devices asked for batches of 510 (rounded up to 512); four turned off."""
    return {
        "one": _train(devices=1, batch_size=512),
        "four": _train(devices=4, batch_size=510),
        "four_off": _train(devices=4, batch_size=512, data_parallel="0"),
    }


def test_four_devices_train_data_parallel(runs):
    four = runs["four"]
    assert four["devices"] == 4 and four["mesh_size"] == 4
    assert four["state_devices"] == 4 and four["state_replicated"]
    assert four["idx_devices"] == 4 and four["idx_spec"] == [None, "data"]
    assert four["all_reduce"]  # the gradients of the row-sharded batch are summed across devices
    assert four["batch_rows"] == 512  # 510 rounded up to a multiple of 4
    assert four["params_devices"] == 1  # inference stays on one device


def test_four_devices_match_one_to_float_rounding(runs):
    """Same seed, same batches: only the order of the sums differs. (Batches of 510,
    had they not been rounded up to 512, drift from these by up to 4e-4 in six epochs.)"""
    one, four = runs["one"], runs["four"]
    assert one["mesh_size"] is None and one["state_devices"] == 1 and not one["all_reduce"]
    assert len(four["val_loss"]) == len(one["val_loss"])
    np.testing.assert_allclose(four["val_loss"], one["val_loss"], rtol=5e-5, atol=0)


def test_turned_off_trains_on_one_device_as_a_one_device_machine(runs):
    """Same program on one device; XLA's product kernels split sums by the threads a
    device gets, which the four faked devices share, so the losses agree to rounding."""
    off, one = runs["four_off"], runs["one"]
    assert off["devices"] == 4 and off["mesh_size"] is None
    assert off["state_devices"] == 1 and off["idx_devices"] == 1 and not off["all_reduce"]
    np.testing.assert_allclose(off["val_loss"], one["val_loss"], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("rows", "devices", "expected"), [(512, 4, 512), (510, 4, 512), (1, 8, 8), (7, 1, 7), (9, 3, 9)]
)
def test_round_up_to_devices(rows, devices, expected):
    assert nn.round_up_to_devices(rows, devices) == expected

