"""Slack in Socket Mode: the adapter connects out to Slack and answers in message threads."""

from adapters.slack.adapter import SlackAdapter
from adapters.slack.config import SlackConfig

__all__ = ["SlackAdapter", "SlackConfig"]
