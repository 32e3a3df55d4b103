"""The engine: an in-process vision-language model worker pool with dynamic batching.

It takes jobs (image bytes, prompt, limits) and yields events; it knows nothing of WebSockets or
IM platforms.
"""
