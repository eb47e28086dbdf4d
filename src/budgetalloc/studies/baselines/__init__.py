"""The six comparison methods of the paper, each allocating through the per-user Lagrangian.

Every method is a :class:`Baseline` (``fit``, ``outcomes``, ``allocation``/``allocate``)::

    model = make_baseline("TPM-XL", max_iter=100).fit(trial, seed=0)
    value, cost = model.outcomes(population.X)      # (n, M) each
    arms = model.allocate(population.X, budget)     # (n,) int, spend <= budget in `cost`

``BASELINES`` maps the paper's names (TPM-SL, TPM-XL, TPM-CF, DRM, DRP, DFCL) to the
classes; docs/baselines.md describes each method.
"""

from __future__ import annotations

from collections.abc import Callable

from budgetalloc.errors import BudgetallocError
from budgetalloc.studies.baselines.base import Baseline
from budgetalloc.studies.baselines.causal_forest import TPMCausalForest
from budgetalloc.studies.baselines.dfcl import DecisionFocusedCausalLearning
from budgetalloc.studies.baselines.direct import DirectRankModel, DirectROIPrediction
from budgetalloc.studies.baselines.meta_learners import TPMSLearner, TPMXLearner

BASELINES: dict[str, Callable[..., Baseline]] = {
    cls.name: cls
    for cls in (TPMSLearner, TPMXLearner, TPMCausalForest, DirectRankModel, DirectROIPrediction,
                DecisionFocusedCausalLearning)
}


def make_baseline(name: str, **knobs) -> Baseline:
    """A new, unfitted baseline by its paper name (a key of ``BASELINES``) and size knobs.

    Raises:
        BudgetallocError: an unknown name or knob, named.
    """
    if name not in BASELINES:
        raise BudgetallocError(f"unknown baseline '{name}' (expected one of {', '.join(BASELINES)})")
    try:
        return BASELINES[name](**knobs)
    except TypeError as err:
        raise BudgetallocError(f"baseline '{name}': {err}") from None


__all__ = ["BASELINES", "Baseline", "make_baseline"]
