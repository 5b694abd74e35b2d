"""Logging for the command line: structlog key-value lines on stderr, stdout kept for reports."""

from __future__ import annotations

import logging
import sys

import structlog


def _stderr_logger(*_: object) -> structlog.PrintLogger:
    # Looked up per call, not bound once: whoever replaces sys.stderr (a test runner, a
    # caller redirecting output) gets the log lines.
    return structlog.PrintLogger(file=sys.stderr)


def configure(verbosity: int = 0, json: bool = False) -> None:
    """Route structlog (and the standard logging of the libraries) to stderr.

    verbosity: -1 warnings only, 0 progress (info), 1 and above debug.
    """
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S" if not json else "iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    # onnxruntime's quantizers log through the root logger; keep their warnings, on stderr.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, force=True)
