"""Process logging with structlog: one line per decision, key=value or JSON."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "console", stream=None) -> None:
    """Send structlog and stdlib logging to ``stream`` (stderr by default).

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``console`` (key=value, readable) or ``json`` (one object per line).
    """
    stream = stream or sys.stderr
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=stream,
                        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    # aiosmtpd logs every command at INFO and each unknown one at WARNING, in its own format
    # and with the client's bytes in it (not JSON, may hold a CR); our own log names the
    # limits it enforces, so only aiosmtpd's errors are kept.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
