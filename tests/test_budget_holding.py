"""Never over budget in truth: HRC's true spend stays within 1.01 x budget on simulated worlds.

Small worlds (a 20k-row trial, tiny network), budgets from 2% to 35% of the
all-max spend, the default statistics: the conservative budget side
(``statistics.budget_cost``, ``cost_margin``) must hold the budget in truth, not
only in its own estimates, at the smallest budgets and with noisy features.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_PARAMS

from budgetalloc.data.contract import trial_from_frame
from budgetalloc.params import SimulateParams, params_from_dict
from budgetalloc.studies.benchmark import HRCMethod, features_of
from budgetalloc.studies.simulate import (
    max_spend,
    score_allocation,
    simulate_population,
    simulate_trial,
)

LEVELS = (0.02, 0.05, 0.1, 0.2, 0.35)


@pytest.mark.slow
@pytest.mark.parametrize("world", [
    SimulateParams(n_users=20_000),
    SimulateParams(n_users=20_000, world="gmv"),
    SimulateParams(n_users=20_000, feature_noise=0.5, label_noise=0.1),
], ids=["binary", "gmv", "noisy-features"])
def test_true_spend_within_budget(world):
    params = params_from_dict({**TINY_PARAMS, "statistics": {"n_scenarios": 20}})
    trial = trial_from_frame(simulate_trial(world, seed=4).frame, source="trial")
    pop = simulate_population(world, seed=5, n_users=20_000)
    allocate = HRCMethod(params=params).fit(trial, seed=4).allocator(features_of(pop.frame, trial.feature_names))
    scale = max_spend(pop.true_cost)
    ratios = [score_allocation(allocate(lv * scale), pop.true_response, pop.true_cost, lv * scale).spend_ratio
              for lv in LEVELS]
    assert max(ratios) <= 1.01, np.round(ratios, 3)
    assert min(ratios) > 0.5  # it still spends: holding the budget by giving nothing would pass trivially
