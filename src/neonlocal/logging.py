"""structlog setup: readable lines on a terminal, JSON lines for journald and launchd.

A last-line-of-defence processor masks anything shaped like a password-bearing URL or a
``password=`` pair, so a secret that slips into an event still never reaches the output.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

_URL_PASSWORD = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s]*)(@)")
_KV_PASSWORD = re.compile(
    r"(?i)\b(password|api_key|apikey|token)(\s*[=:]\s*)('[^']*'|\"[^\"]*\"|\S+)"
)


def redact(text: str) -> str:
    """Mask passwords in URLs (``user:***@host``) and ``password=...`` pairs."""
    text = _URL_PASSWORD.sub(r"\1***\3", text)
    return _KV_PASSWORD.sub(r"\1\2***", text)


def _redact_processor(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
    return event


def configure(
    level: str = "info", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not out.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
