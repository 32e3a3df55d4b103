"""The Telegram Bot API adapter: long polling or webhook intake, file download, edited replies."""

from adapters.telegram.adapter import TelegramAdapter
from adapters.telegram.config import ConfigError, TelegramConfig

__all__ = ["ConfigError", "TelegramAdapter", "TelegramConfig"]
