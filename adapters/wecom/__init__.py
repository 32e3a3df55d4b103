"""WeCom (企业微信) self-built app adapter in callback mode: crypto, XML, API, replies."""

from adapters.wecom.adapter import CallbackReply, WeComAdapter
from adapters.wecom.config import ConfigError, WeComConfig

__all__ = ["CallbackReply", "ConfigError", "WeComAdapter", "WeComConfig"]
