"""The one job pipeline: every job, from any entry point, runs, streams and ends the same way."""
