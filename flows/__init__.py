"""Prefect flows: training, allocation and benchmark (see docs/orchestration.md)."""
