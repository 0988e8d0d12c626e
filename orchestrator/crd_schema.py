"""Turn a CustomResourceDefinition's OpenAPI v3 schema into a strict JSON Schema.

The API server prunes unknown fields of a structural CRD silently; a typo in a manifest
(``nodeSelecter``) would vanish without an error. Validating client-side with
``additionalProperties: false`` wherever the schema lists properties turns that into an error
that names the field.
"""
from __future__ import annotations

from typing import Any


def strict_jsonschema(openapi: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema (draft 7) equivalent of ``openapi`` that rejects unknown fields."""
    out: dict[str, Any] = {}
    for key, value in openapi.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: strict_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = strict_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict_jsonschema(sub) for sub in value]
        elif key == "format":
            continue  # int32/int64/date-time are advisory in Kubernetes too
        else:
            out[key] = value
    if openapi.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in openapi and "additionalProperties" not in openapi \
            and not openapi.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_version_schema(crd: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    """The strict JSON Schema of one served version of a CRD document."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strict_jsonschema(v["schema"]["openAPIV3Schema"])
    raise KeyError(f"CRD has no version {version!r}")
