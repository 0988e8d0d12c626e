"""Benchmarks of orch, each printing our figure beside a peer's measured in the same run."""
