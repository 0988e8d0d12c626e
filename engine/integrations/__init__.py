"""Bridges from other training loops to orch's run contract (``engine.run_contract``).

``engine.integrations.transformers``: a Hugging Face ``Trainer`` callback that writes the run's
status and metrics records, and the checkpoint to resume from (needs the ``hf`` extra).
"""
