"""Atomic writes: an output is either complete and in place, or absent.

Every file and directory the project writes goes to a temporary sibling first and
is renamed into place with ``os.replace`` (atomic on one filesystem), so a crash,
a kill or an error mid-way never leaves a half-written artifact where a reader
(or DVC) would take it for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _remove_stale(path: Path) -> None:
    """Remove temporaries a killed earlier write of ``path`` left beside it.

    One writer per target is assumed (as for any output file); a process killed
    with SIGKILL cannot clean up after itself, so the next write does.
    """
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.old"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; swap it into place on success.

    An existing directory at ``path`` is replaced only after the new one is
    complete; it is moved aside first and removed after the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_files(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success move each file in it into ``directory``.

    Unlike :func:`atomic_directory` the target may hold other files (``reports/``):
    they are kept, and the new files appear only once all of them are complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming.", suffix=".tmp", dir=directory))
    try:
        yield tmp
        for item in sorted(tmp.iterdir()):
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` to Parquet atomically (no pandas index)."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` atomically as Parquet, or CSV when the suffix is ``.csv``."""
    if Path(path).suffix.lower() == ".csv":
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
    else:
        write_parquet(df, path)


def write_json(obj, path: str | Path) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
