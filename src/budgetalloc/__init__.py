"""budgetalloc: marketing budget allocation by hidden-representation clustering.

Importing the package pins the instruction set XLA may compile for on the CPU
(``--xla_cpu_max_isa=AVX2`` in ``XLA_FLAGS``), before JAX starts its backend, so that
networks train to the same bits on any x86-64 CPU with AVX2, with or without
AVX-512. A user's own ``--xla_cpu_max_isa`` in ``XLA_FLAGS`` is kept. What the pin
cannot fix (XLA's results also depend on the number of CPU cores it sees) is in
docs/orchestration.md, section "Same bytes on another machine".
"""

from __future__ import annotations

import os

#: The largest instruction set XLA's CPU code may use (see the module docstring).
XLA_MAX_ISA = "AVX2"


def pin_xla_isa(env: dict = os.environ) -> str:
    """Add ``--xla_cpu_max_isa=AVX2`` to ``env["XLA_FLAGS"]`` unless it names a max ISA; return the flags."""
    flags = env.get("XLA_FLAGS", "")
    if "--xla_cpu_max_isa" not in flags:
        flags = f"{flags} --xla_cpu_max_isa={XLA_MAX_ISA}".strip()
        env["XLA_FLAGS"] = flags
    return flags


pin_xla_isa()
