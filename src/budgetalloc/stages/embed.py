"""Stage ``embed``: the hidden representation ``h(x)`` of every fit row (METHOD stage 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from budgetalloc.fit.pipeline import EMBED_BATCH
from budgetalloc.models.representation import embed, load_representation
from budgetalloc.stages import (
    PARAMS_FILE,
    fit_trial,
    read_preprocessor,
    run,
    save_array,
    stage_params,
)


def main(
    data: Annotated[Path, typer.Option(help="fit part of the trial")],
    preprocess: Annotated[Path, typer.Option(help="preprocessor from `train`")],
    model: Annotated[Path, typer.Option(help="representation model from `train`")],
    out: Annotated[Path, typer.Option(help="embeddings to write (.npy, float32, one row per fit row)")],
    params: Annotated[Path, typer.Option(help="params file")] = PARAMS_FILE,
) -> None:
    """Embed every row of the fit trial."""
    trial = fit_trial(data, stage_params(params))
    Z = read_preprocessor(preprocess).transform(trial.X)
    emb = embed(load_representation(model), Z, batch_size=EMBED_BATCH)
    save_array(emb, out)
    print(f"embed: {emb.shape[0]} rows x {emb.shape[1]} units -> {out}")


if __name__ == "__main__":
    run(main)
