"""Settings of the WebSocket hub, one frozen object the composition root builds from the CLI."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from bridge.grants import TopicGrants
from engine.limits import DEFAULT_LIMITS


@dataclass(frozen=True, slots=True)
class HubConfig:
    """Every knob of the hub; defaults follow docs/protocol.md, under common proxy idle timeouts.

    Attributes:
        tokens: client tokens accepted in ``hello``; empty means every hello is refused (4001).
        admin_tokens: tokens that may also subscribe to ``ops``.
        heartbeat_s: seconds between server pings (45 s stays under nginx's 60 s read timeout).
        heartbeat_timeout_s: seconds to wait for the pong before closing with 4002.
        hello_timeout_s: seconds a new connection has to send ``hello``.
        max_frame_bytes: largest inbound frame; larger ones close with 4004.
        max_image_bytes: largest decoded image in a submit (``too_large`` error frame).
            These two and ``max_prompt_chars`` default to (and the bridge sets them from) the
            shared :class:`~engine.limits.Limits`.
        replay_max_events / replay_max_bytes / replay_max_age_s: replay buffer bounds per session.
        session_ttl_s: how long a session without a connection is kept for resume.
        send_queue_max: outgoing frames queued per connection before it is closed with 4003.
        send_buffer_max_bytes: outgoing bytes one connection may have pending, queued here plus
            what the transport has not yet written to the socket, before it is closed with 4003
            (the kernel's socket buffers come on top; see :meth:`Connection.pending_bytes`).
        submit_rate / submit_burst: per-connection token bucket for submits (``rate_limited``).
        token_submit_rate: submits per second one token may make over all its connections and
            every node sharing the store (a fixed 1-second window in the store); 0 disables it.
        max_connections_per_token: concurrent connections one token may hold (4008 beyond).
        max_prompt_chars: longest prompt accepted (``too_large`` beyond).
        frame_rate / frame_burst: per-connection bucket for all inbound frames (4008 beyond).
        send_timeout_s: a single write that cannot complete in this time marks a slow consumer.
        flush_interval_s: write-behind period of replay buffers and session headers to the store.
        max_topics: subscriptions one session may hold.
        topic_grants: (token, pattern) pairs: the chat topics each client token may subscribe
            to (globs, see :mod:`bridge.grants`); admin tokens may follow every topic.
        max_inflight_bytes: bytes of inbound frames being received, decoded or waiting for the
            engine over all connections (see :mod:`bridge.hub.inflight`); a large frame beyond
            it is dropped unread and answered ``busy``.
        handoff_timeout_s: in a cluster, how long a resume waits for the node holding the session
            to release it before loading it from the store anyway (that node may be dead); at
            most half of ``hello_timeout_s`` is used, since the hello deadline runs meanwhile.
    """

    tokens: frozenset[str] = frozenset()
    admin_tokens: frozenset[str] = frozenset()
    heartbeat_s: float = 45.0
    heartbeat_timeout_s: float = 10.0
    hello_timeout_s: float = 10.0
    max_frame_bytes: int = DEFAULT_LIMITS.max_frame_bytes
    max_image_bytes: int = DEFAULT_LIMITS.max_image_bytes
    replay_max_events: int = 1000
    replay_max_bytes: int = 8 * 2**20
    replay_max_age_s: float = 3600.0
    session_ttl_s: float = 86400.0
    send_queue_max: int = 1024
    send_buffer_max_bytes: int = 4 * 2**20
    submit_rate: float = 10.0
    submit_burst: int = 20
    token_submit_rate: float = 50.0
    max_connections_per_token: int = 1000
    max_prompt_chars: int = DEFAULT_LIMITS.max_prompt_chars
    frame_rate: float = 200.0
    frame_burst: int = 400
    send_timeout_s: float = 30.0
    flush_interval_s: float = 0.5
    max_topics: int = 64
    handoff_timeout_s: float = 1.0
    topic_grants: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    max_inflight_bytes: int = 256 * 2**20
    _grants: TopicGrants = field(
        default_factory=lambda: TopicGrants(()), init=False, repr=False, compare=False
    )
    _labels: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        positive = {
            "heartbeat_s": self.heartbeat_s,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "hello_timeout_s": self.hello_timeout_s,
            "max_frame_bytes": self.max_frame_bytes,
            "max_image_bytes": self.max_image_bytes,
            "replay_max_events": self.replay_max_events,
            "replay_max_bytes": self.replay_max_bytes,
            "replay_max_age_s": self.replay_max_age_s,
            "session_ttl_s": self.session_ttl_s,
            "send_queue_max": self.send_queue_max,
            "send_buffer_max_bytes": self.send_buffer_max_bytes,
            "max_inflight_bytes": self.max_inflight_bytes,
            "submit_rate": self.submit_rate,
            "submit_burst": self.submit_burst,
            "max_connections_per_token": self.max_connections_per_token,
            "frame_rate": self.frame_rate,
            "frame_burst": self.frame_burst,
            "send_timeout_s": self.send_timeout_s,
            "flush_interval_s": self.flush_interval_s,
            "handoff_timeout_s": self.handoff_timeout_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"HubConfig.{name} must be positive, got {value!r}")
        rate = self.token_submit_rate
        if not (rate == 0 or 1 <= rate < float("inf")):
            raise ValueError(f"HubConfig.token_submit_rate must be 0 or at least 1, got {rate!r}")
        for token in self.tokens | self.admin_tokens:
            self._labels[token] = token_label(token)
        grants = TopicGrants((self.label_of(t), pattern) for t, pattern in self.topic_grants)
        object.__setattr__(self, "_grants", grants)

    @property
    def grants(self) -> TopicGrants:
        """The topic grants by token label."""
        return self._grants

    def may_follow(self, label: str | None, admin: bool, topic: str) -> bool:
        """Whether a session of the token labelled ``label`` may subscribe to ``topic``.

        ``ops`` is for admin tokens; chat topics need a matching grant (admins hold all).
        """
        if admin:
            return True
        if topic == "ops":
            return False
        return self._grants.allows(label, topic)

    def label_of(self, token: str) -> str:
        """The printable label of an accepted token (its hash prefix, never the token)."""
        return self._labels.get(token) or token_label(token)


def token_label(token: str) -> str:
    """A stable, non-reversible label for a token, safe for logs, metrics and the dashboard."""
    return "tok-" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:10]
