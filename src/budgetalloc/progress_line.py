"""The stages' progress line, ``progress: NAME i/N [####----] metrics``: written by the stages, parsed by the flows.

Nothing but the standard library, so the flows can follow a stage's output
without importing the stages (and through them JAX and the solvers).
"""

from __future__ import annotations

import re

_PROGRESS = re.compile(r"^progress: (?P<stage>[\w-]+) (?P<done>\d+)/(?P<total>\d+)\b")


def text_bar(done: int, total: int, width: int = 20) -> str:
    """``[########------------]``: ``done`` of ``total`` as a bar of ``width`` characters."""
    filled = round(width * min(done, total) / max(total, 1))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def parse_progress(line: str) -> tuple[str, int, int] | None:
    """``(stage, epochs done, total)`` from a :class:`budgetalloc.stages.StageReporter` line, else ``None``."""
    match = _PROGRESS.match(line.strip())
    if match is None:
        return None
    return match["stage"], int(match["done"]), int(match["total"])
