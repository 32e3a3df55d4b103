"""Warnings of huggingface_hub and transformers reach the log once each, in the log's format."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

CHILD = textwrap.dedent(
    """
    import logging
    from bridge.logs import configure_logging

    configure_logging("info", "json")
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 4s [Retry 3/5].")
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.modeling_utils").warning("a transformers warning")
    """
)


def test_each_library_warning_is_one_json_line() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no plain copy from the libraries' own stderr handlers
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("Retrying in 4s [Retry 3/5].", "warning"),
        ("a transformers warning", "warning"),
    ]
