"""budgetalloc: marketing budget allocation by hidden-representation clustering.

Importing the package pins how XLA computes on the CPU, before JAX starts its
backend, so that networks train to the same bits on any x86-64 CPU with AVX2, with
or without AVX-512, and whatever the number of cores (:data:`XLA_CPU_FLAGS`):
code generated for AVX2 at most, matrix products through oneDNN capped at AVX2
(whose kernels, unlike XLA's own, do not split a sum by thread), and no YNNPACK
fusions (whose reductions do). A flag or ``ONEDNN_MAX_CPU_ISA`` the user set is
kept. docs/orchestration.md, "Same bytes on another machine", has the measurements.
"""

from __future__ import annotations

import os

#: XLA_FLAGS added on import (each unless ``XLA_FLAGS`` already names that flag).
XLA_CPU_FLAGS = (
    "--xla_cpu_max_isa=AVX2",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "--xla_cpu_experimental_ynn_fusion_type=",
)
#: The largest instruction set oneDNN may use (``ONEDNN_MAX_CPU_ISA``).
ONEDNN_MAX_ISA = "AVX2"


def pin_xla_cpu(env: dict = os.environ) -> str:
    """Add :data:`XLA_CPU_FLAGS` to ``env["XLA_FLAGS"]`` and cap oneDNN's ISA; return the flags."""
    flags = env.get("XLA_FLAGS", "")
    for flag in XLA_CPU_FLAGS:
        if flag.split("=")[0] + "=" not in flags:
            flags = f"{flags} {flag}".strip()
    env["XLA_FLAGS"] = flags
    env.setdefault("ONEDNN_MAX_CPU_ISA", ONEDNN_MAX_ISA)
    return flags


pin_xla_cpu()
