"""The listening side of ``bridge serve``: binding its sockets first, naming its URLs, and store
URLs fit for logs."""

from __future__ import annotations

import socket

from aiohttp import web


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host:port`` (every address it resolves to), as asyncio would bind.

    Why bind before anything else: a process that cannot listen must fail before it opens (and,
    for SQLite, locks) the store another process may be using.

    Raises:
        OSError: the address is in use, not local, or does not resolve.
    """
    infos = socket.getaddrinfo(
        host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def site_urls(runner: web.AppRunner, host: str) -> list[str]:
    """The URLs the running site answers on (for the start-up log line)."""
    urls = []
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            h, p = addr[0], addr[1]
            h = f"[{h}]" if ":" in h else h
            urls.append(f"http://{h}:{p}")
    return urls or [f"http://{host}"]


def safe_url(url: str) -> str:
    """A store URL without any password in it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
