"""budgetalloc: marketing budget allocation by hidden-representation clustering.

Importing the package pins how XLA computes on the CPU, before JAX starts its
backend, so that networks train to the same bits on any x86-64 CPU with AVX2, with
or without AVX-512 (:data:`XLA_CPU_FLAGS`): code generated for AVX2 at most, matrix
products in XLA's own kernels (not oneDNN, whose fusion runtime could abort the
process when a compiled function was freed right after it ran) and no YNNPACK
fusions. A flag the user set is kept. The bits still depend on the number of cores
XLA sees; docs/orchestration.md, "Same bytes on another machine", has the
measurements.
"""

from __future__ import annotations

import os

#: XLA_FLAGS added on import (each unless ``XLA_FLAGS`` already names that flag).
XLA_CPU_FLAGS = (
    "--xla_cpu_max_isa=AVX2",
    "--xla_cpu_use_onednn=false",
    "--xla_cpu_experimental_ynn_fusion_type=",
)


def pin_xla_cpu(env: dict = os.environ) -> str:
    """Add :data:`XLA_CPU_FLAGS` to ``env["XLA_FLAGS"]`` (each unless it names that flag); return the flags."""
    flags = env.get("XLA_FLAGS", "")
    for flag in XLA_CPU_FLAGS:
        if flag.split("=")[0] + "=" not in flags:
            flags = f"{flags} {flag}".strip()
    env["XLA_FLAGS"] = flags
    return flags


pin_xla_cpu()
