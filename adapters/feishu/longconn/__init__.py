"""Feishu's long-connection event gateway: frame codec, I/O-free protocol core, asyncio client."""
