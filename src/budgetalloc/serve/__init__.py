"""Serving a policy: allocation (in memory, streamed, partitioned on Dask), evaluation, metrics, pictures."""
