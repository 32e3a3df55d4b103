"""Printing settings objects without their secrets."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import fields
from typing import Any


def masked_repr(obj: Any, secret_fields: Collection[str]) -> str:
    """``Name(field=value, ...)`` of a dataclass; a secret field shows ``'***'`` (or ``''``)."""
    parts = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        shown = ("'***'" if value else "''") if f.name in secret_fields else repr(value)
        parts.append(f"{f.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"
