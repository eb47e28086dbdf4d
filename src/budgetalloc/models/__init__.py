"""The networks: the shared Flax training loop, weight files, the representation and the student."""
