"""Studies over the method: simulated worlds, the benchmark, A/B analysis, the baselines."""
