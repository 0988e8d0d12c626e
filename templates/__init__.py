"""Jinja sources, one directory per backend, rendered by orchestrator/backends/<kind>/render.py
through orchestrator/launch.py's environment (installed as the package orch_templates)."""
