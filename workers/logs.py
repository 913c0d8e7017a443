"""structlog set up to write one JSON object per line to stderr; librdkafka's own log joins it
at debug level."""

from __future__ import annotations

import logging
import sys
from functools import cache

import structlog

LIBRDKAFKA_LOGGER = "lora_workers.librdkafka"


def configure_logging(level: str = "INFO") -> None:
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class _ToStructlog(logging.Handler):
    """librdkafka's lines (`%3|...|FAIL|...` on stderr by default) as debug events: the errors
    that matter reach the log once, through each client's error callback."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger(LIBRDKAFKA_LOGGER).debug(
            "librdkafka", level=record.levelname.lower(), message=record.getMessage()
        )


@cache
def librdkafka_logger() -> logging.Logger:
    """The stdlib logger every Kafka client is given (confluent-kafka's `logger=`)."""
    logger = logging.getLogger(LIBRDKAFKA_LOGGER)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # never to the root logger's stderr handler
    logger.addHandler(_ToStructlog())
    return logger
