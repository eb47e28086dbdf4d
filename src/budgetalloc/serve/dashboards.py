"""Pictures of the stage outputs for analysts: budget curves and clusters, as PNG.

The ``policy`` and ``allocate`` stages write these next to their tables (they are the
image plots of ``dvc plots show``, which need no network), and the Prefect flows embed
the same pictures in their markdown artifacts as ``data:`` URIs (the Prefect UI renders
markdown images). Every picture is drawn from a table a stage wrote, so it never shows
anything the files do not hold.

Invariants: the same table gives the same PNG bytes (Agg backend, fixed size and dpi,
no timestamp or software version in the PNG metadata); no network, no pickle.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from budgetalloc.files import atomic_path

_PNG_METADATA = {"Software": None}  # no matplotlib version in the bytes
_DPI = 100


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata=_PNG_METADATA)
    plt.close(fig)
    return buf.getvalue()


def write_png(png: bytes, path: str | Path) -> None:
    """Write PNG bytes atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(png)


def markdown_image(png: bytes, alt: str) -> str:
    """A markdown image holding the PNG itself (a ``data:`` URI)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def curve_frame(table: list[dict], users: int | None = None) -> pd.DataFrame:
    """A budget table as a curve: level, budget, expected response and spend, per user (or totals for
    ``users`` users, with the budget per user too), and the solver status."""
    scale = users or 1
    cols = {"level": [r["level"] for r in table],
            "budget": [r["budget_per_user"] * scale for r in table],
            "expected_response": [r["expected_response_per_user"] * scale for r in table],
            "expected_spend": [r["expected_cost_per_user"] * scale for r in table]}
    if users:
        cols["budget_per_user"] = [r["budget_per_user"] for r in table]
    return pd.DataFrame(cols | {"status": [r["status"] for r in table]})


def cluster_frame(stats, sizes: np.ndarray, counts: np.ndarray | None = None) -> pd.DataFrame:
    """One row per cluster: size, estimated response and cost under every arm; with the program's (K, M)
    ``counts``, the arm most users get and the users given each arm, else the trial rows its estimates come from."""
    k, m = stats.response.shape
    cols = {"cluster": np.arange(k), "size": np.asarray(sizes, dtype=np.int64)}
    if counts is None:
        cols["estimate_rows"] = stats.counts.sum(axis=1)
    cols.update({f"response_arm_{j}": stats.response[:, j] for j in range(m)})
    cols.update({f"cost_arm_{j}": stats.cost[:, j] for j in range(m)})
    if counts is not None:
        cols["chosen_arm"] = np.argmax(counts, axis=1)
        cols.update({f"users_arm_{j}": counts[:, j] for j in range(m)})
    return pd.DataFrame(cols)


def budget_curve_png(curve: pd.DataFrame, *, title: str, unit: str) -> bytes:
    """Expected response and expected spend against the budget (columns ``budget``,
    ``expected_response``, ``expected_spend``), side by side; ``unit`` labels the axes."""
    budget = curve["budget"].to_numpy(float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(budget, curve["expected_response"], "o-", color="tab:blue")
    left.set_xlabel(f"budget ({unit})")
    left.set_ylabel(f"expected response ({unit})")
    left.set_title("expected response")
    right.plot(budget, curve["expected_spend"], "o-", color="tab:orange", label="expected spend")
    right.plot(budget, budget, ":", color="grey", label="budget (spend limit)")
    right.set_xlabel(f"budget ({unit})")
    right.set_ylabel(f"expected spend ({unit})")
    right.set_title("expected spend")
    right.legend(loc="upper left")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def response_per_cost(clusters: pd.DataFrame) -> np.ndarray:
    """Per cluster, the extra response per extra unit of cost of its chosen arm over control.

    A cluster left at control (arm 0) shows the best ratio any coupon would give it
    (which the budget did not buy). A cost gain of zero gives NaN.
    """
    arms = sorted(int(c.removeprefix("response_arm_")) for c in clusters if c.startswith("response_arm_"))
    resp = clusters[[f"response_arm_{j}" for j in arms]].to_numpy(float)
    cost = clusters[[f"cost_arm_{j}" for j in arms]].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (resp - resp[:, :1]) / (cost - cost[:, :1])
    ratio[:, 0] = np.nan
    ratio[~np.isfinite(ratio)] = np.nan
    chosen = clusters["chosen_arm"].to_numpy(int)
    out = ratio[np.arange(len(chosen)), chosen]
    best = np.full(len(chosen), np.nan)
    has = ~np.all(np.isnan(ratio[:, 1:]), axis=1) if ratio.shape[1] > 1 else np.zeros(len(chosen), bool)
    best[has] = np.nanmax(ratio[has, 1:], axis=1)
    return np.where(chosen == 0, best, out)


def clusters_png(clusters: pd.DataFrame, *, title: str) -> bytes:
    """Each cluster as a point: size (x), response per cost of its chosen arm (y), coloured by
    the chosen arm (columns ``size``, ``chosen_arm``, ``response_arm_j``, ``cost_arm_j``)."""
    ratio = response_per_cost(clusters)
    size = clusters["size"].to_numpy(float)
    chosen = clusters["chosen_arm"].to_numpy(int)
    fig, ax = plt.subplots(figsize=(10, 4.6))
    cmap = plt.get_cmap("tab10")
    for arm in sorted(set(chosen.tolist())):
        sel = chosen == arm
        label = f"arm {arm} ({int(sel.sum())} clusters, {int(size[sel].sum())} users)"
        if arm == 0:
            label = f"control: {label} (y: best coupon's ratio)"
        ax.scatter(size[sel], np.nan_to_num(ratio[sel], nan=0.0), s=40, color=cmap(arm % 10),
                   marker="x" if arm == 0 else "o", label=label)
    for i in np.argsort(-size)[:12]:
        ax.annotate(str(int(clusters["cluster"].iloc[i])), (size[i], np.nan_to_num(ratio[i])),
                    textcoords="offset points", xytext=(4, 3), fontsize=7, color="dimgrey")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("cluster size (users)")
    ax.set_ylabel("extra response per extra cost\n(chosen arm vs control)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="chosen arm")
    fig.tight_layout()
    return _png(fig)


def chosen_arms(budget_table: list[dict], level: float | None = None) -> tuple[dict, list[int]]:
    """The budget-table row nearest ``level`` (default: the middle row) and the arm most of each
    cluster's users get there."""
    if level is None:
        level = budget_table[len(budget_table) // 2]["level"]
    row = min(budget_table, key=lambda r: abs(r["level"] - level))
    return row, [max(range(len(shares)), key=shares.__getitem__) for shares in row["arm_shares"]]


def significant(value, digits: int = 3):
    """A float rounded to ``digits`` significant digits (other values as they are)."""
    if isinstance(value, float) and np.isfinite(value):
        return float(f"{value:.{digits}g}")
    return value


def analyst_table(clusters: pd.DataFrame, digits: int = 3) -> list[dict]:
    """The cluster table for a dashboard: ``chosen_arm`` first, floats at ``digits`` significant digits."""
    first = ["chosen_arm", "cluster", "size"]
    columns = [c for c in first if c in clusters] + [c for c in clusters if c not in first]
    records = clusters[columns].to_dict(orient="records")
    return [{k: significant(v.item() if hasattr(v, "item") else v, digits) for k, v in r.items()} for r in records]
