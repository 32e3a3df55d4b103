"""The OpenAI-compatible HTTP API (``/v1/*``), the SSE analyze endpoint and the ``/chat`` page.

Modules: :mod:`~bridge.http.parse` (request validation, no I/O), :mod:`~bridge.http.chat` (events
to chunks), :mod:`~bridge.http.sse` (the wire), :mod:`~bridge.http.jobs` (submit and chunk logs),
:mod:`~bridge.http.resume` (streams and resume), :mod:`~bridge.http.routes` (aiohttp handlers).
"""
