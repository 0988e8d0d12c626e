"""Turn a CustomResourceDefinition's OpenAPI v3 schema into a strict JSON Schema, and ship it.

The API server prunes unknown fields of a structural CRD silently; a typo in a manifest
(``nodeSelecter``) would vanish without an error. Validating client-side with
``additionalProperties: false`` wherever the schema lists properties turns that into an error
that names the field.

Users do not have the CRD file our tests install (it lives in the shared test tools), so the
package carries a compact copy of what validation needs: the strict schema of the PyTorchJob's
``spec`` without descriptions or the ``status`` subresource (``pytorchjob_v1.schema.json``).
Regenerate it when the CRD is updated, and a test checks it still matches:

    python -m orchestrator.backends.kubernetes.crd_schema path/to/kubeflow.org_pytorchjobs.yaml \
        > orchestrator/backends/kubernetes/pytorchjob_v1.schema.json

``schema_errors`` checks an object against such a schema. It understands only the keywords a
structural CRD schema turns into (``SUPPORTED``) and refuses any other, so it needs no JSON Schema
library: importing one would cost ``orch render`` a third of its start-up time. A test checks it
agrees with the ``jsonschema`` package.
"""
from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path
from typing import Any

PACKAGED_SCHEMA = Path(__file__).with_name("pytorchjob_v1.schema.json")
SUPPORTED = frozenset({"type", "properties", "additionalProperties", "required", "items", "anyOf", "pattern",
                       "default", "description"})
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


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


def schema_errors(value: Any, schema: dict[str, Any],
                  path: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], str]]:
    """Every place ``value`` breaks ``schema``: (path, message), messages worded as jsonschema's."""
    unknown = set(schema) - SUPPORTED
    if unknown:
        raise ValueError(f"schema keyword(s) {sorted(unknown)} at {path} are not supported by schema_errors")
    if "type" in schema and not _TYPES[schema["type"]](value):
        return [(path, f"{value!r} is not of type {schema['type']!r}")]
    errors: list[tuple[tuple[str | int, ...], str]] = []
    if "anyOf" in schema and all(schema_errors(value, sub, path) for sub in schema["anyOf"]):
        errors.append((path, f"{value!r} is not valid under any of the given schemas"))
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        errors.append((path, f"{value!r} does not match {schema['pattern']!r}"))
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append((path, f"{name!r} is a required property"))
        extra = schema.get("additionalProperties", True)
        unexpected = [k for k in value if k not in props]
        if extra is False and unexpected:
            listed = ", ".join(repr(k) for k in unexpected)
            errors.append((path, f"Additional properties are not allowed ({listed} "
                                 f"{'was' if len(unexpected) == 1 else 'were'} unexpected)"))
        for key, item in value.items():
            if key in props:
                errors += schema_errors(item, props[key], (*path, key))
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, (*path, key))
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], (*path, i))
    return errors


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
