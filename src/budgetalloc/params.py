"""The schema of ``params.yaml``: one frozen, validated section per stage.

``params.yaml`` is the single source of configuration. Every section is a frozen
pydantic model that forbids unknown keys, so a typo is an error naming the key
instead of a silently ignored setting. Library functions take the section they
need (``TrainParams`` for the representation network, ``ProgramParams`` for the
integer program, ...), never the whole file, so a DVC stage can list exactly the
keys it reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from budgetalloc.errors import ParamsError


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SimulateParams(_Section):
    """The simulated default trial (``make run``, tests, benchmarks)."""

    world: Literal["binary", "gmv"] = "binary"
    n_users: int = Field(200_000, ge=100)
    n_features: int = Field(20, ge=10)
    n_arms: int = Field(5, ge=2, le=16)
    label_noise: float = Field(0.0, ge=0.0, le=0.5)
    cost_outliers: float = Field(0.0, ge=0.0, le=0.5)
    feature_noise: float = Field(0.0, ge=0.0)
    missing_rate: float = Field(0.0, ge=0.0, lt=1.0)
    arm_shares: tuple[float, ...] | None = None

    @field_validator("arm_shares")
    @classmethod
    def _shares_sum_to_one(cls, v):
        if v is not None and (min(v) <= 0 or abs(sum(v) - 1.0) > 1e-6):
            raise ValueError("arm_shares must be positive and sum to 1")
        return v


class DataParams(_Section):
    """How the trial is read and split."""

    features: tuple[str, ...] | None = None
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    honest_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="share of the training rows kept out of the network"
    )
    stream_rows: int = Field(
        2_000_000, ge=1, description="`fit` streams a Parquet trial with more rows than this"
    )
    preprocess_sample: int = Field(
        1_000_000, ge=100,
        description="streamed fit: rows (a seeded sample) the preprocessor is fitted on; in memory: every row",
    )


#: A network's learning-rate schedule over its epochs (:func:`budgetalloc.models.nn.scheduled`).
Schedule = Annotated[
    Literal["constant", "cosine"],
    Field(description="cosine: the learning rate decays to 0 along a cosine over the epochs"),
]


class TrainParams(_Section):
    """Multi-task representation network (stage 1)."""

    hidden: int = Field(256, ge=4)
    head_hidden: int = Field(32, ge=1)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(2048, ge=1)
    learning_rate: float = Field(1e-2, gt=0.0)
    weight_decay: float = Field(
        1.0, ge=0.0, description="AdamW's decoupled decay (times the learning rate): the network's regulariser"
    )
    decay_rows: int = Field(
        200_000, ge=0,
        description="above this many network rows weight_decay is scaled down in proportion (0: never)",
    )
    schedule: Schedule = "cosine"
    huber_delta: float = Field(1.0, gt=0.0)
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    patience: int = Field(30, ge=1)
    max_rows: int = Field(
        1_000_000, ge=100, description="the network trains on at most this many train rows (a seeded sample)"
    )


class ClusterParams(_Section):
    """k-means on the standardised hidden representation (stage 2)."""

    k: int = Field(64, ge=2)
    metric: Literal["task", "standardised"] = Field(
        "task", description="task: the metric the task heads induce on h; standardised: per unit"
    )
    metric_rank: int = Field(16, ge=1)
    n_init: int = Field(3, ge=1)
    max_iter: int = Field(100, ge=1)
    fit_sample: int = Field(200_000, ge=100, description="rows k-means is fitted on")
    streaming_threshold: int = Field(
        2_000_000, ge=1, description="above this many rows MiniBatchKMeans.partial_fit is used"
    )
    batch_size: int = Field(8192, ge=1)
    roi_bins: int = Field(
        2, ge=1, le=16,
        description="each k-means cluster cut into this many cells by the network's predicted best incremental ROI",
    )
    roi_min_rows: int = Field(
        1000, ge=0,
        description="roi_bins cut the clusters only where every (cell, arm) keeps this many fit rows on average",
    )


class StatisticsParams(_Section):
    """Per-cluster, per-arm estimates and bootstrap scenarios (stage 3)."""

    estimator: Literal["mean", "winsorize", "median_of_means"] = "winsorize"
    clip_z: float = Field(
        5.0, gt=0.0, description="winsorize: non-zero values clipped to median +- clip_z robust sd"
    )
    mom_blocks: int = Field(10, ge=2)
    pooling: Literal["empirical_bayes", "rows"] = Field(
        "empirical_bayes", description="how far a cell's own correction is trusted (see statistics.py)"
    )
    shrinkage: float = Field(
        20.0, ge=0.0, description="pooling=rows: pseudo-rows of the network's prediction in each cell"
    )
    n_scenarios: int = Field(50, ge=1)
    budget_cost: Literal["pooled", "upward"] = Field(
        "upward", description="upward: a cell's cost is pooled towards its prior only upwards (see statistics.py)"
    )
    cost_margin: float = Field(
        1.5, ge=0.0, description="cost standard errors added to every cell's cost, the budget side (0: none)"
    )
    rows: Literal["all", "honest"] = Field(
        "all", description="fit rows the cells are estimated on: every one, or those the network did not learn from"
    )
    min_cell_rows: int = Field(5, ge=1)
    clip_sample: int = Field(
        1_000_000, ge=100, description="winsorize: honest rows (a seeded sample) the bands are taken from"
    )


class ProgramParams(_Section):
    """The stochastic integer program (stage 4)."""

    alpha: float = Field(0.0, ge=0.0, lt=1.0)
    chance: Literal["cvar", "bigm"] = Field(
        "cvar", description="formulation of the chance constraint when alpha > 0"
    )
    split: bool = True
    time_limit: float = Field(10.0, gt=0.0)
    mip_rel_gap: float = Field(1e-4, ge=0.0, lt=1.0)
    allow_control: bool = True
    budget_levels: tuple[float, ...] = Field(
        (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0),
        description="budgets as fractions of the all-max-arm spend",
    )

    @field_validator("budget_levels")
    @classmethod
    def _levels_positive(cls, v):
        if not v or min(v) < 0:
            raise ValueError("budget_levels must be a non-empty list of numbers >= 0")
        return tuple(sorted(v))


class DistillParams(_Section):
    """The student classifier used for serving (stage 5)."""

    hidden: int = Field(256, ge=4)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(2048, ge=1)
    learning_rate: float = Field(1e-2, gt=0.0)
    schedule: Schedule = "cosine"
    soft_temperature: float = Field(
        0.0, ge=0.0, description="0: hard labels; >0: soft targets from centroid distances"
    )
    patience: int = Field(3, ge=1)
    holdout_fraction: float = Field(
        0.1, gt=0.0, lt=0.5, description="rows kept from the student to measure its agreement"
    )
    max_rows: int = Field(
        1_000_000, ge=100, description="the student trains on at most this many rows (a seeded sample)"
    )


class AllocateParams(_Section):
    """Serving: allocating a population under a total budget."""

    budget: float = Field(10_000.0, ge=0.0)
    batch_size: int = Field(262_144, ge=1)
    users: str = Field(
        "data/population.csv", min_length=1, description="population file the `allocate` stage reads"
    )


class Params(_Section):
    """All of ``params.yaml``."""

    seed: int = Field(0, ge=0)
    simulate: SimulateParams = SimulateParams()
    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    cluster: ClusterParams = ClusterParams()
    statistics: StatisticsParams = StatisticsParams()
    program: ProgramParams = ProgramParams()
    distill: DistillParams = DistillParams()
    allocate: AllocateParams = AllocateParams()


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    return f"{source}: invalid value for '{key}' ({value!r}): {first['msg']}"


def params_from_dict(raw: dict, *, source: str = "params") -> Params:
    """Validate a parsed YAML mapping into the frozen :class:`Params`; ParamsError naming the
    first offending key and value (and ``source``, usually the file path)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_describe(err, source)) from None
    if params.cluster.roi_bins > 1 and params.distill.soft_temperature > 0:
        raise ParamsError(f"{source}: distill.soft_temperature {params.distill.soft_temperature} needs "
                          f"cluster.roi_bins 1 (soft targets are over the k-means clusters), "
                          f"got {params.cluster.roi_bins}")
    return params


def load_params(path: str | Path | None = None) -> Params:
    """Load and validate a params YAML file (keys left out take their defaults; ``None``: all);
    ParamsError when the file is missing, is not YAML, or fails the schema."""
    if path is None:
        return Params()
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = parse_yaml(path.read_text())
    except _DuplicateKey as err:
        raise ParamsError(f"{path}: {err}") from None
    except UnicodeDecodeError:
        raise ParamsError(f"{path}: not valid UTF-8 text") from None
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}") from None
    return params_from_dict(raw, source=str(path))


class _DuplicateKey(yaml.YAMLError):
    """A mapping repeats a key (YAML would silently keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    where = f"lines {seen[key]} and {line}" if seen[key] != line else f"line {line}"
                    raise _DuplicateKey(f"duplicate key {key!r} ({where})")
                seen[key] = line
            except TypeError:  # an unhashable key: the constructor's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str):
    """YAML parsed by a safe loader that refuses a repeated key (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def params_to_dict(params: Params) -> dict:
    """A plain JSON/YAML-serialisable dict of the params (tuples become lists)."""
    return params.model_dump(mode="json")


def with_overrides(params: Params, changes: dict, *, source: str = "command line") -> Params:
    """A copy of ``params`` with dotted-key overrides (``{"simulate.world": "gmv"}``) validated.

    Keys whose value is ``None`` are ignored (an option the user did not give).

    Raises:
        ParamsError: an unknown key or an invalid value, named.
    """
    raw = params_to_dict(params)
    for dotted, value in changes.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return params_from_dict(raw, source=source)
