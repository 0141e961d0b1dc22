"""Logging to the host log (tagged by the host with this entity's ref).

Log lines are written immediately, even if the turn later fails. ``print()`` goes to
WASI stdout, which the host also captures; these functions carry a level.
"""

from __future__ import annotations

from ._core import current_host

__all__ = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "log", "trace", "debug", "info", "warn", "error"]

TRACE, DEBUG, INFO, WARN, ERROR = 0, 1, 2, 3, 4


def log(level: int, message: str) -> None:
    """Writes ``message`` at ``level`` (0 trace … 4 error; higher counts as error)."""
    current_host().log(max(0, min(int(level), 4)), str(message))


def trace(message: str) -> None:
    log(TRACE, message)


def debug(message: str) -> None:
    log(DEBUG, message)


def info(message: str) -> None:
    log(INFO, message)


def warn(message: str) -> None:
    log(WARN, message)


def error(message: str) -> None:
    log(ERROR, message)
