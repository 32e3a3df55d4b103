"""The Feishu adapter's live status (the shared tracker, under the name Feishu's code uses)."""

from adapters.status import StatusTracker

__all__ = ["StatusTracker"]
