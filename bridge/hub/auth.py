"""Who may use /ws: token checks in constant time and the per-token connection cap."""

from __future__ import annotations

import hmac

from bridge.hub.config import HubConfig


class TokenGate:
    """Checks hello tokens against the configured ones and counts each token's connections.

    Args:
        cfg: the hub's settings (client and admin tokens, ``max_connections_per_token``).
    """

    def __init__(self, cfg: HubConfig) -> None:
        self.cfg = cfg
        self._tokens = [t.encode() for t in sorted(cfg.tokens | cfg.admin_tokens)]
        self._admin = [t.encode() for t in sorted(cfg.admin_tokens)]
        self._per_token: dict[str, int] = {}

    @property
    def configured(self) -> bool:
        """Whether any token is configured (without one, every hello is refused)."""
        return bool(self._tokens)

    def authenticate(self, token: str) -> tuple[bool, bool]:
        """(valid, admin), comparing against every configured token so timing reveals nothing."""
        given = token.encode("utf-8", "surrogatepass")
        valid = False
        admin = False
        for known in self._tokens:
            valid |= hmac.compare_digest(given, known)
        for known in self._admin:
            admin |= hmac.compare_digest(given, known)
        return valid and bool(token), admin

    def acquire(self, label: str) -> bool:
        """Count one more connection of the token labelled ``label``; False at the cap."""
        held = self._per_token.get(label, 0)
        if held >= self.cfg.max_connections_per_token:
            return False
        self._per_token[label] = held + 1
        return True

    def release(self, label: str) -> None:
        """A connection counted by :meth:`acquire` is gone."""
        left = self._per_token.get(label, 1) - 1
        if left > 0:
            self._per_token[label] = left
        else:
            self._per_token.pop(label, None)
