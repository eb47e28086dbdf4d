"""The networks: the shared Flax training loop, weight files, the representation and the student.

Importing this package turns JAX's asynchronous dispatch off on the CPU (before the
backend starts): with it on, a compiled function dropped while its oneDNN fusion
still ran could abort the process (``OneDnnFusionThunk`` pool check). Results do not
change; only when Python waits for them.
"""

import jax

jax.config.update("jax_cpu_enable_async_dispatch", False)
