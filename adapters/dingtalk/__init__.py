"""DingTalk (钉钉) bot adapter in Stream mode: an outbound WebSocket, no public URL needed."""

from adapters.dingtalk.adapter import DingTalkAdapter
from adapters.dingtalk.config import DingTalkConfig

__all__ = ["DingTalkAdapter", "DingTalkConfig"]
