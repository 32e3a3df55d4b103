"""Parsing and validating the query string of ``GET /api/connections`` and ``/api/events``."""

from __future__ import annotations

from collections.abc import Mapping

from bridge.dashboard.errors import ApiError
from bridge.dashboard.source import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_QUERY_CHARS,
    SORT_FIELDS,
    ConnectionQuery,
)

_MAX_OFFSET = 1_000_000_000


def _bad(name: str, why: str) -> ApiError:
    return ApiError(400, "bad_request", f"query parameter {name!r} {why}")


def _int(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.strip().isdigit():
        raise _bad(name, f"must be an integer between {low} and {high}")
    value = int(raw.strip())
    if not low <= value <= high:
        raise _bad(name, f"must be an integer between {low} and {high}")
    return value


def parse_query(
    params: Mapping[str, str], default_limit: int | None = DEFAULT_LIMIT
) -> ConnectionQuery:
    """A :class:`ConnectionQuery` from ``q``, ``state``, ``sort``, ``order``, ``offset``, ``limit``.

    Without ``sort`` the newest connections come first; ``sort=F`` is ascending unless it has a
    leading ``-`` (``sort=-rtt_ms``) or ``order=desc``. Without ``limit`` the page holds
    ``default_limit`` rows (None: every matching row).

    Raises:
        ApiError: 400 ``bad_request`` naming the offending parameter.
    """
    q = params.get("q", "")
    if len(q) > MAX_QUERY_CHARS:
        raise _bad("q", f"is longer than {MAX_QUERY_CHARS} characters")
    if any(ord(ch) < 32 for ch in q):
        raise _bad("q", "contains control characters")
    state = params.get("state") or None
    if state is not None and (len(state) > 32 or not state.replace("_", "").isalnum()):
        raise _bad("state", "must be a short word such as open or closing")
    sort = params.get("sort") or ""
    # Newest first by default; an explicit sort is ascending unless it has a leading "-".
    desc_default = not sort or sort.startswith("-")
    sort = sort.removeprefix("-") or "connected_at"
    if sort not in SORT_FIELDS:
        raise _bad("sort", f"must be one of {', '.join(sorted(SORT_FIELDS))}")
    order = params.get("order")
    if order is not None and order not in ("asc", "desc"):
        raise _bad("order", "must be asc or desc")
    desc = desc_default if order is None else order == "desc"
    return ConnectionQuery(
        q=q,
        state=state,
        sort=sort,
        desc=desc,
        offset=_int(params, "offset", 0, 0, _MAX_OFFSET),
        limit=(
            _int(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
            if "limit" in params
            else default_limit
        ),
    )
