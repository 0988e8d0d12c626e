"""`python -m orchestrator` is `orch`."""
from .cli import app

app(prog_name="orch")
