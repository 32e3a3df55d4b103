"""The Feishu adapter's live status: the platform-neutral tracker in :mod:`adapters.status`."""

from adapters.status import StatusTracker

__all__ = ["StatusTracker"]
