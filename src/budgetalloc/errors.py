"""The project's exception types.

Every error a user can cause (bad file, bad column, bad params, impossible budget)
is raised as a :class:`BudgetallocError` with a one-line message naming the file,
column, key or value. The CLI turns these into exit code 2 without a traceback.
"""

from __future__ import annotations


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
