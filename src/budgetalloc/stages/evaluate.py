"""Stage ``evaluate``: the policy on the held-out test part (IPS cost curve, AUCC, plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from budgetalloc.commands import run_evaluate
from budgetalloc.stages import run


def main(
    policy: Annotated[Path, typer.Option(help="policy directory from `policy`")],
    data: Annotated[Path, typer.Option(help="test part of the trial from `prepare`")],
    out: Annotated[Path, typer.Option(help="directory for metrics.json, curve.json and curve.png")],
) -> None:
    """Evaluate the policy on the test trial."""
    metrics = run_evaluate(policy_dir=policy, data=data, out=out)
    print(f"evaluate: AUCC {metrics['aucc']:.4f} on {metrics['n_test']} held-out users -> {out}")


if __name__ == "__main__":
    run(main)
