"""Materialise the input ``data/`` that ``data.dvc`` records: from the DVC cache, else the simulator.

``data/`` is the pipeline's input (``dvc add data``), not a stage's output. On a fresh
clone (empty cache) ``make run`` calls this module: it checks ``data/`` out of the
cache when it can, else simulates it deterministically from ``params.yaml``
(``simulate``, ``seed``): ``data/trial.csv`` and ``data/population.csv``, which must
then match ``data.dvc`` and are committed to the cache. CSV, not Parquet: Parquet
records its writer's version, so the bytes would depend on pyarrow's. A non-empty
``data/`` is the user's and is left alone; without ``data.dvc`` the simulated data is added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from budgetalloc.commands import run_simulate
from budgetalloc.errors import DataError
from budgetalloc.stages import PARAMS_FILE, run

DATA_DIR = Path("data")
TRIAL_FILE = "trial.csv"
POPULATION_FILE = "population.csv"
POPULATION_SIZE = 100_000


def simulate_data(data_dir: Path, params_file: Path, *, population_size: int = POPULATION_SIZE) -> None:
    """Write the simulated trial and population into ``data_dir`` (seed ``seed`` and ``seed + 1``)."""
    run_simulate(
        out=data_dir / TRIAL_FILE,
        population=data_dir / POPULATION_FILE,
        truth=None,
        population_size=population_size,
        params_path=params_file,
        seed=None,
        overrides={},
    )


def materialise(root: Path, *, params_file: Path | None = None, population_size: int = POPULATION_SIZE) -> str:
    """Make ``root/data`` match ``root/data.dvc``; return how (present, checked out, simulated, added).

    Raises:
        DataError: the simulated data does not match ``data.dvc`` (the simulator or
            the ``simulate`` params changed without ``dvc add data``).
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(root).resolve()
    data, record = root / DATA_DIR, root / f"{DATA_DIR}.dvc"
    params_file = params_file or root / PARAMS_FILE
    if data.is_dir() and any(data.iterdir()):
        return "present"
    with Repo(str(root)) as repo:
        if not record.exists():
            simulate_data(data, params_file, population_size=population_size)
            repo.add(str(data))
            return "simulated and added"
        try:
            repo.checkout(targets=[str(record)])
            return "checked out of the DVC cache"
        except DvcException:
            simulate_data(data, params_file, population_size=population_size)
        (stage,) = repo.stage.collect(str(record))
        # `dvc status` would only say "not in cache" here: compare the workspace with the record
        if any(out.workspace_status() for out in stage.outs):
            raise DataError(
                f"{data}: the simulated data does not match {record.name}; the simulator or the "
                "`simulate` params changed: run `dvc add data` to record the new input"
            )
        repo.commit(str(record), force=True)
    return "simulated"


def main(
    root: Annotated[Path, typer.Option(help="repository root")] = Path("."),
    population_size: Annotated[int, typer.Option(help="population rows")] = POPULATION_SIZE,
) -> None:
    """Materialise data/ when it is missing."""
    how = materialise(root, population_size=population_size)
    print(f"data/: {how}")


if __name__ == "__main__":
    run(main)
