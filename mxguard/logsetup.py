"""Process logging with structlog: one line per decision, key=value or JSON.

By default the log goes to stderr (journald collects it under systemd); with
``log.file`` it goes to a file rotated by size through the standard library's
:class:`logging.handlers.RotatingFileHandler`. Command output (tables, ids)
always goes to stdout, so the two never mix.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_FILE_LOGGER = "mxguard.process-log"


_root_handler: logging.Handler | None = None


class _Formatter(logging.Formatter):
    """Lines structlog rendered pass as they are; other libraries' records get a time and level."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s [%(levelname)s] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if record.name == _FILE_LOGGER else super().format(record)


class _LineToHandler:
    """A file-like object for structlog's PrintLogger that hands each line to a logging handler.

    The handler does the rotation; structlog keeps rendering the line (key=value or JSON).
    """

    def __init__(self, handler: logging.Handler):
        self.handler = handler

    def write(self, text: str) -> None:
        line = text.rstrip("\n")
        if line:
            self.handler.emit(logging.LogRecord(_FILE_LOGGER, logging.INFO, "", 0, line, None, None))

    def flush(self) -> None:
        self.handler.flush()


def configure(level: str = "info", fmt: str = "console", stream=None, *, file: Path | None = None,
              max_bytes: int = 50 * 1024 * 1024, backup_count: int = 10) -> None:
    """Send structlog and stdlib logging to ``stream`` (stderr by default) or to ``file``.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``console`` (key=value, readable) or ``json`` (one object per line).
        stream: where lines go when no ``file`` is given.
        file: a log file, rotated at ``max_bytes`` (bytes) keeping ``backup_count`` old files.

    Raises:
        OSError: the log file cannot be opened.
    """
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(file, maxBytes=max_bytes, backupCount=backup_count,
                                                       encoding="utf-8")
        stream = _LineToHandler(handler)
        stdlib_handler: logging.Handler = handler
    else:
        stream = stream or sys.stderr
        stdlib_handler = logging.StreamHandler(stream)
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
        # One write per line (the line and its newline together): several worker processes share
        # stderr, and with unbuffered streams (PYTHONUNBUFFERED, common in containers) print()'s
        # two writes let another process's line in between.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    stdlib_handler.setFormatter(_Formatter())
    # Our one handler on the root logger, replaced on reconfiguration; other handlers stay.
    global _root_handler
    root = logging.getLogger()
    if _root_handler is not None:
        root.removeHandler(_root_handler)
        if _root_handler is not stdlib_handler:
            _root_handler.close()
    _root_handler = stdlib_handler
    root.addHandler(stdlib_handler)
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    # aiosmtpd logs every command at INFO and each unknown one at WARNING, in its own format
    # and with the client's bytes in it (not JSON, may hold a CR); our own log names the
    # limits it enforces, so only aiosmtpd's errors are kept.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


def configure_from_settings(settings) -> None:
    """:func:`configure` from a data dir's ``[log]`` section (``mxguard.config.LogSettings``).

    Raises:
        ConfigError: the log file cannot be opened (the message names ``log.file``).
    """
    from mxguard.errors import ConfigError

    log = settings.log
    path = settings.path(log.file) if log.file else None
    try:
        configure(log.level, log.format, file=path, max_bytes=log.max_bytes, backup_count=log.backup_count)
    except OSError as exc:
        configure(log.level, log.format)
        raise ConfigError(f"log.file: cannot write {path}: {exc.strerror or exc}") from None
