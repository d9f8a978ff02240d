"""Session-wide pytest hooks."""

from __future__ import annotations

import os


def pytest_terminal_summary(terminalreporter):
    """Print what the reliability suite tried (counts show with or without -s)."""
    import reliability_util

    lines = reliability_util.report_lines()
    if lines:
        terminalreporter.section("reliability")
        for line in lines:
            terminalreporter.write_line(line)
    target = os.environ.get("LYCORIS_RELIABILITY_JSON")
    if lines and target:
        reliability_util.write_json(target)
