"""Jinja sources rendered by orchestrator/render.py."""
