"""YAML reading with YAML 1.2 number rules and errors that name the file and line.

PyYAML follows YAML 1.1, where ``nodes: 1:3`` is the sexagesimal integer 63 and ``on``/``no``
are booleans. An elastic node range silently becoming 63 nodes is exactly the kind of surprise
a job tool must not have, so this loader only knows YAML 1.2's core schema numbers and
booleans.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema ints, floats and booleans."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (
        "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    return int(text, 0) if text.lower().startswith(("0o", "0x")) else int(text)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def loads(text: str, *, source: str = "<string>") -> Any:
    """Parse YAML text; a syntax error becomes a UserError naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}: invalid YAML: {problem}",
                        hint="check indentation and quote values containing ':' or '#'") from None


def load_file(path: str | Path) -> Any:
    """Read and parse a YAML file, with clear errors for a missing or unreadable file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{p}: is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: cannot read: {exc}") from None
    return loads(text, source=str(p))


def parse_scalar(text: str) -> Any:
    """Parse one ``--set`` value the way it would read in the YAML file."""
    return loads(text, source="--set value") if text.strip() else ""
