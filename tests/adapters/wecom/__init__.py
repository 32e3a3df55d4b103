"""Tests of the WeCom adapter."""
