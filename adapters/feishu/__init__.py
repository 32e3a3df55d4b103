"""The Feishu (Lark) adapter: webhook and long-connection intake, image download, reply cards."""

from adapters.feishu.adapter import FeishuAdapter
from adapters.feishu.config import ConfigError, FeishuConfig

__all__ = ["ConfigError", "FeishuAdapter", "FeishuConfig"]
