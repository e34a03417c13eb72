"""Fault scenarios: print each scenario's ``faults: <name> <passed>/<total> trials passed``."""

from __future__ import annotations

import pytest

from tests.faults.support import SUMMARY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.section("fault-injection trials")
        for line in SUMMARY:
            terminalreporter.write_line(line)
