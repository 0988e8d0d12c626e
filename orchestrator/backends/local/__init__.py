"""The local backend: N simulated nodes (torchrun agents) on this machine under a detached supervisor."""
