"""The six comparison methods of the paper, each allocating through the per-user Lagrangian.

Every method has the same interface (:class:`Baseline`)::

    model = make_baseline("TPM-XL", max_iter=100).fit(trial, seed=0)
    value, cost = model.outcomes(population.X)      # (n, M) each
    arms = model.allocate(population.X, budget)     # (n,) int, spend <= budget in `cost`

========  =====================================  ==========================================
name      class                                  what it learns
========  =====================================  ==========================================
TPM-SL    :class:`TPMSLearner`                   S-learner (boosting, arm as a feature)
TPM-XL    :class:`TPMXLearner`                   X-learner per arm vs control (boosting)
TPM-CF    :class:`TPMCausalForest`               GRF causal forest (EconML) + control model
DRM       :class:`DirectRankModel`               direct rank score, calibrated to ROI
DRP       :class:`DirectROIPrediction`           log-ROI by the DRP convex loss
DFCL      :class:`DecisionFocusedCausalLearning` r, c by decision loss + prediction loss
========  =====================================  ==========================================

Size knobs (epochs, hidden, n_estimators, max_iter, ...) are keyword-only
constructor arguments; :func:`make_baseline` passes them through.
"""

from __future__ import annotations

from collections.abc import Callable

from budgetalloc.errors import BudgetallocError
from budgetalloc.studies.baselines.base import Baseline, BaselineBase
from budgetalloc.studies.baselines.causal_forest import TPMCausalForest
from budgetalloc.studies.baselines.dfcl import DecisionFocusedCausalLearning
from budgetalloc.studies.baselines.direct import DirectRankModel, DirectROIPrediction
from budgetalloc.studies.baselines.meta_learners import TPMSLearner, TPMXLearner

BASELINES: dict[str, Callable[..., Baseline]] = {
    cls.name: cls
    for cls in (
        TPMSLearner,
        TPMXLearner,
        TPMCausalForest,
        DirectRankModel,
        DirectROIPrediction,
        DecisionFocusedCausalLearning,
    )
}


def make_baseline(name: str, **kwargs) -> Baseline:
    """A new, unfitted baseline by its paper name.

    Args:
        name: one of ``BASELINES`` (``"TPM-SL"``, ``"TPM-XL"``, ``"TPM-CF"``, ``"DRM"``,
            ``"DRP"``, ``"DFCL"``).
        **kwargs: the method's keyword-only size knobs.

    Returns:
        The unfitted baseline.

    Raises:
        BudgetallocError: an unknown name or knob, named.
    """
    if name not in BASELINES:
        raise BudgetallocError(
            f"unknown baseline '{name}' (expected one of {', '.join(BASELINES)})"
        )
    try:
        return BASELINES[name](**kwargs)
    except TypeError as err:
        raise BudgetallocError(f"baseline '{name}': {err}") from None


__all__ = [
    "BASELINES",
    "Baseline",
    "BaselineBase",
    "DecisionFocusedCausalLearning",
    "DirectROIPrediction",
    "DirectRankModel",
    "TPMCausalForest",
    "TPMSLearner",
    "TPMXLearner",
    "make_baseline",
]
