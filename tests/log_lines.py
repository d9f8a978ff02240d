"""A logging handler that keeps the messages, for the scripts run inside a real ComfyUI."""

from __future__ import annotations

import logging


class WarningLines(logging.Handler):
    """Every WARNING-or-worse message logged while attached (ComfyUI reports dropped keys so)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())
