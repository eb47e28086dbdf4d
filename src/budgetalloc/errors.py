"""The project's exception types.

Every error a user can cause (bad file, bad column, bad params, impossible budget)
is raised as a :class:`BudgetallocError` with a one-line message naming the file,
column, key or value. The CLI turns these into exit code 2 without a traceback.
A fault of the environment (disk full, permissions, a path that is a file, an
unreachable scheduler) stays an ``OSError``; :func:`describe_os_error` words it as
one line naming the path or address, and the CLI exits 2 with it as well.
"""

from __future__ import annotations

import errno
import functools
import sys


class BudgetallocError(Exception):
    """Base class of every user-facing error of budgetalloc."""


class DataError(BudgetallocError):
    """A trial or population table violates the data contract."""


class ParamsError(BudgetallocError):
    """A params file is missing, malformed, or has unknown or out-of-range keys."""


class PolicyError(BudgetallocError):
    """A policy artifact is missing, truncated, edited or incompatible."""


class SolverError(BudgetallocError):
    """The integer program could not produce a feasible allocation."""


_ERRNO_HINTS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}


def describe_os_error(err: OSError) -> str:
    """One line for a fault of the environment (any ``OSError``): ``"PATH: what happened"``, or the
    first line of the error when it names no path (or address)."""
    what = err.strerror or _first_line(err) or type(err).__name__
    hint = _ERRNO_HINTS.get(err.errno)
    if hint and hint not in what:
        what = f"{what} ({hint})"
    if err.filename is None:
        detail = _first_line(err) or what
        return detail if not hint or hint in detail else f"{detail} ({hint})"
    where = str(err.filename)
    if err.filename2 is not None:
        where += f" -> {err.filename2}"
    return f"{where}: {what}"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else ""


def handle_errors(fn):
    """Turn project errors and faults of the environment into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BudgetallocError as err:
            line = " ".join(str(err).split("\n"))
        except OSError as err:
            line = describe_os_error(err)
        import typer  # the command line's exit; imported only when a command fails

        print(f"error: {line}", file=sys.stderr)
        raise typer.Exit(code=2)

    return wrapper
