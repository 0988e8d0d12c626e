"""A JobSpec as a Kubeflow PyTorchJob manifest (templates/kubernetes/pytorchjob.yaml.j2), validated.

The manifest is parsed back and checked (validate.py) before it is returned, so nothing that
``orch render`` shows or ``orch submit`` sends can carry a value that changed its structure.
"""
from __future__ import annotations

from ...launch import base_context, render_template, side_files
from ...spec import JobSpec
from ...types import Placement, Rendered
from .manifest import manifest_context, pod_placement
from .validate import validate_manifest_text

TEMPLATE = "kubernetes/pytorchjob.yaml.j2"


def render(spec: JobSpec, placement: Placement | None = None) -> Rendered:
    """The PyTorchJob manifest, and the ds_config the ConfigMap carries beside it."""
    placement = placement or pod_placement(spec)
    context = base_context(spec, placement)
    files = side_files(spec)
    context.update(manifest_context(spec, placement, files, context["program_argv"], context["job_env"]))
    text = render_template(TEMPLATE, context)
    validate_manifest_text(text, spec)
    return Rendered("kubernetes", "manifest", "pytorchjob.yaml", text, files, placement)
