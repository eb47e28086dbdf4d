"""Network artifacts on disk: weights (flax msgpack, never pickle) and a JSON config.

One folder per network: ``weights.msgpack`` holds the parameters as a pure
dictionary of arrays; ``config.json`` the artifact's kind, the format version, the
weights' SHA-256, the configuration that rebuilds the network and its training
history. Loading checks all of these and the shape of every array against the
configured network: an edited, truncated or mismatched file is one clear
:class:`~budgetalloc.errors.PolicyError`, never a crash deep in JAX.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from budgetalloc.errors import PolicyError
from budgetalloc.models.nn import FitHistory, TrainedNet

WEIGHTS_FILE = "weights.msgpack"
CONFIG_FILE = "config.json"
_FORMAT_VERSION = 1
Net = TypeVar("Net", bound=TrainedNet)


def save_model(net: TrainedNet, directory: str | Path) -> Path:
    """Write ``net`` into ``directory`` (created if missing) as ``weights.msgpack`` and
    ``config.json``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = flax.serialization.to_bytes(jax.tree.map(np.asarray, nnx.to_pure_dict(net.params)))
    (directory / WEIGHTS_FILE).write_bytes(weights)
    meta = {
        "kind": net.kind,
        "format": _FORMAT_VERSION,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "config": asdict(net.config),
        "history": asdict(net.history),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_model(cls: type[Net], directory: str | Path) -> Net:
    """Read a ``cls`` artifact written by :func:`save_model`, checking kind, checksum and shapes.

    Raises:
        PolicyError: a file is missing, unreadable, of another kind, edited, or its
            weights do not fit its configuration.
    """
    directory, kind = Path(directory), cls.kind
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        weights = (directory / WEIGHTS_FILE).read_bytes()
    except (OSError, ValueError) as err:
        raise PolicyError(f"{directory}: cannot read the {kind} artifact ({err})") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind or meta.get("format") != _FORMAT_VERSION:
        raise PolicyError(f"{directory}: not a {kind} artifact of format {_FORMAT_VERSION}")
    if hashlib.sha256(weights).hexdigest() != meta.get("sha256"):
        raise PolicyError(f"{directory / WEIGHTS_FILE}: checksum mismatch (edited or truncated)")
    try:
        config = cls.config_cls(**meta["config"])
        history = FitHistory.from_dict(meta["history"])
    except (KeyError, TypeError) as err:
        raise PolicyError(f"{directory / CONFIG_FILE}: malformed {kind} configuration ({err})") from None
    graphdef, state = nnx.split(nnx.eval_shape(lambda: config.build(0)))  # the structure only
    pure = flax.serialization.msgpack_restore(weights)
    expected = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(state))
    try:
        found = jax.tree.map(lambda a: (a.shape, a.dtype), pure)
    except Exception:  # noqa: BLE001 - any malformed payload is one error to the user
        found = None
    if found != expected:
        raise PolicyError(f"{directory}: saved weights do not match the configured network")
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return cls(graphdef, state, config, history)
