"""The dashboard's bundled static files (its pages, script and styles), read once at startup and
served by name only, with the one server-side notice the login page can show."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from bridge.dashboard.errors import ApiError

STATIC_DIR = Path(__file__).with_name("static")
_STATIC_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".html": "text/html",
}
_LOGIN_ERROR_MARK = "<!--login-error-->"


class Pages:
    """The assets of :data:`STATIC_DIR`, by file name."""

    def __init__(self) -> None:
        self._static = load_static()

    def asset(self, name: str) -> web.Response:
        """One bundled script, style sheet or image (pages only through :meth:`html`).

        Raises:
            ApiError: 404 for an unknown name or an ``.html`` file.
        """
        asset = None if name.endswith(".html") else self._static.get(name)
        if asset is None:
            raise ApiError(404, "not_found", "no such asset")
        body, content_type = asset
        return web.Response(
            body=body, content_type=content_type, headers={"Cache-Control": "no-cache"}
        )

    def html(self, name: str, status: int = 200, error: str | None = None) -> web.Response:
        """The page ``name``, with ``error`` (a fixed server sentence) as its login notice."""
        body, _ = self._static[name]
        # Only fixed server-side sentences ever go into the page, never request data.
        notice = f'<p class="login-error" role="alert">{error}</p>' if error else ""
        text = body.decode("utf-8").replace(_LOGIN_ERROR_MARK, notice)
        headers = {"Cache-Control": "no-store"}
        return web.Response(text=text, status=status, content_type="text/html", headers=headers)


def load_static() -> dict[str, tuple[bytes, str]]:
    """Every servable file of :data:`STATIC_DIR`: name → (bytes, content type)."""
    assets: dict[str, tuple[bytes, str]] = {}
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file() and path.suffix in _STATIC_TYPES:
            assets[path.name] = (path.read_bytes(), _STATIC_TYPES[path.suffix])
    return assets
