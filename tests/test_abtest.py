"""A/B analysis: exact lifts on a hand-computed table, simulated A/A and A/B, bad tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from budgetalloc.data.contract import trial_from_frame
from budgetalloc.fit.fit_stream import fit_policy
from budgetalloc.params import params_from_dict
from budgetalloc.policy import save_policy
from budgetalloc.studies.abtest import analyse_ab, simulate_ab
from budgetalloc.studies.simulate import SimulateParams, simulate_trial

runner = CliRunner()
Z975 = 1.959963984540054
TINY = {
    "seed": 3,
    "train": {"hidden": 16, "head_hidden": 4, "epochs": 3, "batch_size": 512, "patience": 1},
    "cluster": {"k": 6, "n_init": 1},
    "distill": {"hidden": 16, "epochs": 3, "batch_size": 512},
    "statistics": {"n_scenarios": 5},
    "program": {"budget_levels": [0.1, 0.5]},
}


def hand_table() -> pd.DataFrame:
    """Control A: orders 0,1,1,2; treatment B: orders 1,1,2,2 (GMV = 10 x order index)."""
    return pd.DataFrame({
        "group": ["A", "B"] * 4,
        "orders": [0, 1, 1, 1, 1, 2, 2, 2],
        "gmv": [0.0, 10.0, 10.0, 20.0, 20.0, 30.0, 30.0, 40.0],
        "cost": [0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0],
    })


def test_hand_computed_lifts_cis_and_p_values(app, tmp_path):
    src, out = tmp_path / "ab.csv", tmp_path / "report.json"
    hand_table().to_csv(src, index=False)
    res = runner.invoke(app, ["abtest", "--data", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["control_group"] == "A" and rep["treatment_group"] == "B"
    a, b = rep["groups"]["A"], rep["groups"]["B"]
    assert (a["users"], a["orders_per_user"], a["gmv_per_user"], a["cost_per_user"], a["spend"]) == (
        4, 1.0, 15.0, 1.0, 4.0)
    assert (b["users"], b["orders_per_user"], b["gmv_per_user"], b["cost_per_user"], b["spend"]) == (
        4, 1.5, 25.0, 1.5, 6.0)
    # orders: m_C = 1, s_C^2 = 2/3; m_T = 1.5, s_T^2 = 1/3; n = 4 each.
    orders = rep["metrics"]["orders"]
    se = math.sqrt((1 / 3) / 4 + 1.5**2 * (2 / 3) / 4)  # = sqrt(5.5 / 12)
    assert orders["lift"] == pytest.approx(0.5)
    assert orders["lift_ci_low"] == pytest.approx(0.5 - Z975 * se)
    assert orders["lift_ci_high"] == pytest.approx(0.5 + Z975 * se)
    # Welch: t = 0.5 / sqrt(1/12 + 2/12) = 1, df = 0.25^2 / ((1/12)^2/3 + (2/12)^2/3) = 5.4
    assert orders["p_value"] == pytest.approx(2 * stats.t.sf(1.0, 5.4))
    assert orders["diff"] == pytest.approx(0.5) and orders["significant"] is False
    # gmv: m_C = 15, m_T = 25, both variances 500/3.
    gmv = rep["metrics"]["gmv"]
    se = math.sqrt((500 / 3) / 4 / 15**2 + 25**2 * (500 / 3) / 4 / 15**4)
    assert gmv["lift"] == pytest.approx(2 / 3)
    assert gmv["lift_ci_low"] == pytest.approx(2 / 3 - Z975 * se)
    assert gmv["lift_ci_high"] == pytest.approx(2 / 3 + Z975 * se)
    assert gmv["p_value"] == pytest.approx(stats.ttest_ind([10, 20, 30, 40], [0, 10, 20, 30],
                                                           equal_var=False).pvalue)
    assert rep["significant"] == {"orders": False, "gmv": False}
    assert rep["verdict"] == {"orders": "not significant", "gmv": "not significant"}
    assert "+50.000%" in res.output


def test_control_group_option_flips_the_comparison():
    rep = analyse_ab(hand_table(), control_group="B")
    assert rep.control == "B" and rep.metrics[0].lift == pytest.approx(1 / 1.5 - 1)


def test_strong_effect_in_a_table_is_detected():
    rng = np.random.default_rng(5)
    n = 4000
    group = np.repeat(["ctl", "new"], n)
    orders = (rng.random(2 * n) < np.where(group == "new", 0.2, 0.1)).astype(float)
    df = pd.DataFrame({"group": group, "orders": orders, "gmv": orders * 30.0, "cost": orders})
    rep = analyse_ab(df)
    for m in rep.metrics:
        assert m.significant and m.lift_ci_low > 0.5 and m.p_value < 1e-10


def test_simulated_aa_false_positive_rate_is_near_alpha():
    hits, covers = 0, 0
    seeds = range(60)
    for seed in seeds:
        table, _ = simulate_ab("control", "control", budget_per_user=0.0, users=4000, seed=seed)
        orders = analyse_ab(table, control_group="A").metrics[0]
        hits += orders.significant
        covers += orders.lift_ci_low <= 0 <= orders.lift_ci_high
    assert hits <= 8 and covers >= 52


def test_simulated_aa_via_cli_is_not_significant(app, tmp_path):
    out, outcomes = tmp_path / "aa.json", tmp_path / "aa.parquet"
    res = runner.invoke(app, ["abtest", "--simulate", "--policy-a", "control", "--policy-b", "control",
                              "--budget-per-user", "0.5", "--users", "20000", "--seed", "1",
                              "--out", str(out), "--outcomes", str(outcomes)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    for metric in ("orders", "gmv"):
        m = rep["metrics"][metric]
        assert not m["significant"] and m["lift_ci_low"] < 0 < m["lift_ci_high"]
    assert rep["groups"]["A"]["users"] + rep["groups"]["B"]["users"] == 20000
    assert rep["groups"]["A"]["spend"] == 0 and rep["simulation"]["truth"]["B"]["arm_shares"][0] == 1.0
    again = analyse_ab(pd.read_parquet(outcomes), control_group="A")
    assert again.metrics[0].lift == pytest.approx(rep["metrics"]["orders"]["lift"])


def test_simulated_gmv_world_outcomes_follow_the_truth():
    table, info = simulate_ab("control", "control", budget_per_user=0.0, users=20000, seed=3, world="gmv")
    assert set(table["treatment"]) == {0} and (table["cost"] == 0).all()
    assert ((table["gmv"] > 0) == (table["orders"] > 0)).all()
    for label in ("A", "B"):
        rows = table[table["group"] == label]
        truth = info["truth"][label]
        assert rows["orders"].mean() == pytest.approx(truth["expected_orders_per_user"], rel=0.08)
        assert rows["gmv"].mean() == pytest.approx(truth["expected_gmv_per_user"], rel=0.12)


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    world = simulate_trial(SimulateParams(n_users=4000), seed=1)
    policy = fit_policy(trial_from_frame(world.frame, source="trial"), params_from_dict(TINY))
    directory = tmp_path_factory.mktemp("policy") / "policy"
    save_policy(policy, directory)
    return directory


def test_fitted_policy_beats_control_in_a_simulated_test(app, tmp_path, tiny_policy):
    out = tmp_path / "ab.json"
    res = runner.invoke(app, ["abtest", "--simulate", "--policy-a", "control", "--policy-b",
                              str(tiny_policy), "--budget-per-user", "0.3", "--users", "20000",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    orders = rep["metrics"]["orders"]
    assert orders["significant"] and orders["lift_ci_low"] > 0, orders
    assert rep["verdict"]["orders"] == "significant increase"
    truth = rep["simulation"]["truth"]
    assert truth["B"]["expected_orders_per_user"] > truth["A"]["expected_orders_per_user"]
    assert rep["groups"]["B"]["spend"] > 0 and rep["groups"]["A"]["spend"] == 0


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda df: df.drop(columns=["gmv"]), "'gmv'"),
        (lambda df: df.rename(columns={"orders": "order"}), "'orders'"),
        (lambda df: df.assign(group=["A", "B", "C", "A", "B", "C", "A", "B"]), "exactly two"),
        (lambda df: df.assign(group="A"), "exactly two"),
        (lambda df: df.assign(orders=["1", "x", "1", "1", "1", "2", "2", "2"]), "'orders'"),
        (lambda df: df.assign(cost=[0.0, 1.0, None, 1.0, 1.0, 2.0, 2.0, 2.0]), "'cost'"),
        (lambda df: df.assign(cost=-df["cost"] - 1), "negative"),
        (lambda df: df.assign(group=["A"] + ["B"] * 7), "fewer than 2"),
    ],
)
def test_bad_tables_exit_2_with_one_line_and_no_output(app, tmp_path, edit, needle):
    src, out = tmp_path / "ab.csv", tmp_path / "report.json"
    edit(hand_table()).to_csv(src, index=False)
    res = runner.invoke(app, ["abtest", "--data", str(src), "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output, lines
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--simulate", "--policy-a", "control"],
        ["--simulate", "--policy-a", "control", "--policy-b", "control", "--budget-per-user", "-1"],
        ["--simulate", "--policy-a", "control", "--policy-b", "control", "--budget-per-user", "1",
         "--world", "mars"],
        ["--simulate", "--policy-a", "nowhere", "--policy-b", "control", "--budget-per-user", "1"],
        ["--data", "ab.csv", "--control-group", "Z"],
    ],
)
def test_bad_options_exit_2(app, tmp_path, args, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hand_table().to_csv("ab.csv", index=False)
    res = runner.invoke(app, ["abtest", *args, "--out", "r.json"])
    assert res.exit_code == 2, res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1, res.output
    assert not (tmp_path / "r.json").exists()


def test_world_mismatch_with_the_policy_exits_2(app, tmp_path, tiny_policy):
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["abtest", "--simulate", "--policy-a", "control", "--policy-b",
                              str(tiny_policy), "--budget-per-user", "0.3", "--world", "gmv",
                              "--out", str(out)])
    assert res.exit_code == 2 and "binary-world" in res.output and not out.exists(), res.output


def test_integer_groups_and_degenerate_metrics():
    df = hand_table().assign(group=[0, 1] * 4, gmv=0.0)
    rep = analyse_ab(df, control_group="1")
    assert (rep.control, rep.treatment) == ("1", "0")
    gmv = rep.metrics[1]
    assert gmv.lift is None and gmv.p_value is None and not gmv.significant
    assert json.loads(json.dumps(rep.to_json()))["metrics"]["gmv"]["lift"] is None
