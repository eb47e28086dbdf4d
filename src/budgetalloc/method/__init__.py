"""The method over clusters: k-means, per-cluster statistics, the integer program, Lagrangian allocation."""
