"""The dedupe rule for IM messages: one answer per message, however often the platform delivers it.

A message is new when none of its keys (``<platform>:msg:<message id>``, and
``<platform>:evt:<event id>`` when the platform gives one; :attr:`InboundMessage.dedupe_keys`)
was claimed in the last :data:`DEDUPE_TTL_S`. Recording and claiming are one store call
(:meth:`~bridge.store.base.Store.accept_entry`): the inbox entry is written before the keys are
claimed, so a crash between the two leaves a pending entry that recovery answers, never a claimed
key with nothing behind it. A message that was recorded but could not be scheduled has its claims
forgotten, so the platform's re-delivery is taken as new.
"""

from __future__ import annotations

import contextlib

from adapters.base import InboundMessage
from bridge.store import InboxEntry, Store, StoreUnavailable

#: How long a claimed key makes later deliveries duplicates: Feishu re-pushes up to 6 h later,
#: Slack and Telegram within minutes; the keys are kept well past that.
DEDUPE_TTL_S = 24 * 3600.0


def entry_id(msg: InboundMessage) -> str:
    """The inbox id of a message: stable across re-deliveries."""
    return f"{msg.platform}:{msg.message_id}"


async def record_once(store: Store, msg: InboundMessage, now: float) -> InboxEntry | None:
    """Record ``msg`` in the inbox and claim its keys; None when it is a duplicate.

    Raises:
        StoreUnavailable: nothing could be recorded; the platform must re-deliver.
    """
    entry = InboxEntry(entry_id(msg), msg.to_json().encode(), now)
    if not await store.accept_entry(entry, msg.dedupe_keys, DEDUPE_TTL_S):
        return None
    return entry


async def forget(store: Store, msg: InboundMessage) -> None:
    """Release the claims of ``msg`` (best effort), so its next delivery is taken as new."""
    for key in msg.dedupe_keys:
        with contextlib.suppress(StoreUnavailable):
            await store.release(key)
