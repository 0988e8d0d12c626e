"""Turn a CustomResourceDefinition's OpenAPI v3 schema into a strict JSON Schema, and ship it.

The API server prunes unknown fields of a structural CRD silently; a typo in a manifest
(``nodeSelecter``) would vanish without an error. Validating client-side with
``additionalProperties: false`` wherever the schema lists properties turns that into an error
that names the field.

Users do not have the CRD file our tests install (it lives in the shared test tools), so the
package carries a compact copy of what validation needs: the strict schema of the PyTorchJob's
``spec`` without descriptions or the ``status`` subresource (``pytorchjob_v1.schema.json``).
Regenerate it when the CRD is updated, and a test checks it still matches:

    python -m orchestrator.crd_schema path/to/kubeflow.org_pytorchjobs.yaml > orchestrator/pytorchjob_v1.schema.json
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

PACKAGED_SCHEMA = Path(__file__).with_name("pytorchjob_v1.schema.json")


def strict_jsonschema(openapi: dict[str, Any], *, descriptions: bool = True) -> dict[str, Any]:
    """A JSON Schema (draft 7) equivalent of ``openapi`` that rejects unknown fields."""
    out: dict[str, Any] = {}
    for key, value in openapi.items():
        if key.startswith("x-kubernetes-") or (key == "description" and not descriptions):
            continue
        if key == "properties":
            out[key] = {name: strict_jsonschema(sub, descriptions=descriptions) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = strict_jsonschema(value, descriptions=descriptions)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict_jsonschema(sub, descriptions=descriptions) for sub in value]
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


def crd_version_schema(crd: dict[str, Any], version: str = "v1", *, descriptions: bool = True) -> dict[str, Any]:
    """The strict JSON Schema of one served version of a CRD document."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strict_jsonschema(v["schema"]["openAPIV3Schema"], descriptions=descriptions)
    raise KeyError(f"CRD has no version {version!r}")


def compact_schema(crd: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    """What client-side validation of a new object needs: no descriptions, no ``status``."""
    schema = crd_version_schema(crd, version, descriptions=False)
    schema["properties"].pop("status", None)
    return schema


def compact_schema_text(crd: dict[str, Any], version: str = "v1") -> str:
    """The packaged file's exact text (sorted keys, so regenerating it gives a reviewable diff)."""
    return json.dumps(compact_schema(crd, version), sort_keys=True, separators=(",", ":")) + "\n"


@functools.lru_cache(maxsize=1)
def pytorchjob_schema() -> dict[str, Any]:
    """The packaged strict schema of kubeflow.org/v1 PyTorchJob (spec only)."""
    return json.loads(PACKAGED_SCHEMA.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - maintenance entry point
    import yaml

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    docs = [d for d in yaml.safe_load_all(Path(args[0]).read_text(encoding="utf-8")) if d]
    sys.stdout.write(compact_schema_text(docs[0]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
