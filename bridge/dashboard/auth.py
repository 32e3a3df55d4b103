"""Admin authentication for the dashboard: token checks, signed session cookies, CSRF tokens.

The cookie never carries the admin token: it carries ``v1.<expiry>.<nonce>.<hmac>`` signed with a
key derived from the token, so rotating the token logs everyone out and a leaked cookie expires.
The CSRF token is an HMAC of the session nonce (a signed double-submit value), so it needs no
server-side state. Every comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

SESSION_COOKIE = "bridge_admin"
CSRF_COOKIE = "bridge_csrf"
CSRF_HEADER = "X-CSRF-Token"
_VERSION = "v1"
_MAX_COOKIE_CHARS = 256


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class Session:
    """A verified dashboard session: its nonce (for CSRF and logout) and expiry (Unix seconds)."""

    nonce: str
    expires_at: int


class AdminAuth:
    """Checks the admin token and issues and verifies dashboard sessions."""

    def __init__(
        self,
        admin_token: str,
        session_ttl_s: float = 12 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not admin_token:
            raise ValueError("admin token must not be empty")
        self._token_digest = _digest(admin_token)
        self._key = hmac.new(
            admin_token.encode("utf-8", "surrogatepass"), b"bridge-dashboard-v1", hashlib.sha256
        ).digest()
        self._ttl = session_ttl_s
        self._clock = clock
        self._revoked: dict[str, int] = {}
        self._lock = threading.Lock()

    def check_token(self, candidate: str) -> bool:
        """True when ``candidate`` is the admin token (constant-time, length not leaked)."""
        return hmac.compare_digest(_digest(candidate), self._token_digest)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self) -> tuple[str, Session]:
        """A new session: the cookie value and the session it encodes."""
        nonce = secrets.token_urlsafe(18)
        expires = int(self._clock() + self._ttl)
        payload = f"{_VERSION}.{expires}.{nonce}"
        return f"{payload}.{self._sign(payload)}", Session(nonce=nonce, expires_at=expires)

    def verify(self, cookie: str | None) -> Session | None:
        """The session a cookie value carries, or ``None`` if it is forged, expired or revoked."""
        if not cookie or len(cookie) > _MAX_COOKIE_CHARS or not cookie.isascii():
            return None
        parts = cookie.split(".")
        if len(parts) != 4 or parts[0] != _VERSION:
            return None
        version, expires_raw, nonce, signature = parts
        expected = self._sign(f"{version}.{expires_raw}.{nonce}")
        if not hmac.compare_digest(signature.encode("ascii"), expected.encode("ascii")):
            return None
        if not expires_raw.isdigit():
            return None
        expires = int(expires_raw)
        now = self._clock()
        if expires <= now:
            return None
        with self._lock:
            if nonce in self._revoked:
                return None
        return Session(nonce=nonce, expires_at=expires)

    def revoke(self, session: Session) -> None:
        """Make a session invalid before it expires (logout); forgets revocations past expiry."""
        now = self._clock()
        with self._lock:
            self._revoked[session.nonce] = session.expires_at
            for nonce, expires in list(self._revoked.items()):
                if expires <= now:
                    del self._revoked[nonce]

    def csrf_token(self, session: Session) -> str:
        """The CSRF token that belongs to a session."""
        return self._sign(f"csrf.{session.nonce}")

    def check_csrf(self, session: Session, candidate: str | None) -> bool:
        """True when ``candidate`` is the session's CSRF token (constant-time)."""
        if not candidate or len(candidate) > _MAX_COOKIE_CHARS or not candidate.isascii():
            return False
        expected = self.csrf_token(session)
        return hmac.compare_digest(candidate.encode("ascii"), expected.encode("ascii"))


class LoginLimiter:
    """Refuses further login attempts from a remote after ``max_failures`` within ``window_s``."""

    def __init__(
        self,
        max_failures: int = 10,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        max_remotes: int = 10_000,
    ) -> None:
        self._max = max_failures
        self._window = window_s
        self._clock = clock
        self._max_remotes = max_remotes
        self._failures: dict[str, list[float]] = {}

    def _recent(self, remote: str, now: float) -> list[float]:
        kept = [t for t in self._failures.get(remote, ()) if now - t < self._window]
        if kept:
            self._failures[remote] = kept
        else:
            self._failures.pop(remote, None)
        return kept

    def blocked(self, remote: str) -> bool:
        """True while ``remote`` has used up its failed attempts for the window."""
        return len(self._recent(remote, self._clock())) >= self._max

    def failed(self, remote: str) -> None:
        """Count one failed attempt; bounded memory even under a flood of distinct remotes."""
        now = self._clock()
        if remote not in self._failures and len(self._failures) >= self._max_remotes:
            for key in list(self._failures):
                self._recent(key, now)
            if len(self._failures) >= self._max_remotes:
                self._failures.pop(next(iter(self._failures)))
        self._failures.setdefault(remote, []).append(now)

    def succeeded(self, remote: str) -> None:
        """Forget the failures of a remote that logged in."""
        self._failures.pop(remote, None)
