"""Helm chart(s) shipped with orch."""
