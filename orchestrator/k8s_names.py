"""Kubernetes' naming rules: DNS-1035 labels (job names), label keys and values, annotation keys.

The job spec checks names with these rules when it is loaded, and the Kubernetes backend checks
the finished manifest with them before sending it; both use this one module.
"""
from __future__ import annotations

import re
from typing import Any

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def is_dns1035_label(name: Any) -> bool:
    """1-63 lowercase letters, digits and '-', starting with a letter, not ending with '-'."""
    return isinstance(name, str) and len(name) <= 63 and DNS1035.match(name) is not None


def label_problems(where: str, labels: Any) -> list[str]:
    problems = []
    for key, value in (labels or {}).items():
        prefix, _, name = str(key).rpartition("/")
        if (prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix))) \
                or len(name) > 63 or not LABEL_NAME.match(name):
            problems.append(f"{where}: key {key!r} is not a valid label key (optional DNS prefix and '/', then "
                            "at most 63 of A-Z a-z 0-9 - _ . starting and ending alphanumeric)")
        if not isinstance(value, str) or len(value) > 63 or (value and not LABEL_NAME.match(value)):
            problems.append(f"{where}.{key}: {value!r} is not a valid label value (at most 63 of "
                            "A-Z a-z 0-9 - _ . starting and ending alphanumeric)")
    return problems


def annotation_problems(where: str, annotations: Any) -> list[str]:
    """Annotation keys follow the label-key rules; values are free text."""
    problems = []
    for key in (annotations or {}):
        prefix, _, name = str(key).rpartition("/")
        if (prefix and not DNS1123_SUBDOMAIN.match(prefix)) or len(name) > 63 or not LABEL_NAME.match(name):
            problems.append(f"{where}: key {key!r} is not a valid annotation key")
    return problems
