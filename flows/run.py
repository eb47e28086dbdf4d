"""What ``make run`` does: train through DVC, allocate the default scenario, say where everything is.

Both flows run in one process, in Prefect's ephemeral mode (a temporary local
server on SQLite under ``PREFECT_HOME``; nothing to start by hand). The flow
runs and their artifacts stay in that database: ``prefect server start --host
127.0.0.1`` shows them afterwards.

    python -m flows.run
"""

from __future__ import annotations

from pathlib import Path

from flows import orchestration as orch
from flows.allocation import allocation_flow
from flows.training import ROOT, training_flow


def summary_text(root: Path, trained: dict, scenario: dict) -> str:
    """What ``make run`` prints at the end: the runs, where things are, how to reproduce them."""
    allocation = (f"allocation: experiment {scenario['experiment']}, budget {scenario['budget']:.6g} for "
                  f"{scenario['users']} users, expected spend {scenario['expected_spend']:.6g}, "
                  f"expected response {scenario['expected_response']:.6g}")
    return "\n".join([
        "",
        f"training: experiment {trained['experiment']}, AUCC {trained['aucc']:.4f} on the test split",
        allocation,
        "",
        "Reports and models:",
        orch.where_markdown(root),
        "",
        "Prefect artifacts (budget curves, clusters, reports, training progress):",
        "  prefect server start --host 127.0.0.1   then open http://127.0.0.1:4200/artifacts",
        "  (or the flow runs' Artifacts tabs under http://127.0.0.1:4200/runs)",
        "",
        "Reproduce: `dvc exp show` lists both experiments; `dvc exp apply NAME` brings one back;",
        "`dvc status` should report that data and pipelines are up to date.",
    ])


def main() -> None:
    """Run the training flow and the default allocation flow; print where the outputs are."""
    trained = training_flow(root=ROOT)
    scenario = allocation_flow(root=ROOT)
    print(summary_text(ROOT, trained, scenario))


if __name__ == "__main__":
    main()
