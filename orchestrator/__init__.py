"""orch: render, submit and follow multi-node training jobs (local, Slurm, Kubernetes)."""
__version__ = "0.1.0"
