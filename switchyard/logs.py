"""Log format: Faust's plain lines by default, JSON lines (python-json-logger) on request.

Faust's worker sets up logging itself (``-l LEVEL``); JSON output is passed to
it as a ``logging.config`` dictionary, so every logger, Faust's included,
writes one JSON object per line when ``SWITCHYARD_LOG_JSON=true``.
"""

from __future__ import annotations

from typing import Any

from switchyard.settings import Settings

__all__ = ["faust_logging_config", "json_logging_config"]


def json_logging_config(level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dictionary writing JSON lines to stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
                "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            }
        },
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }


def faust_logging_config(settings: Settings) -> dict[str, Any] | None:
    """The ``logging_config`` Faust setting: JSON when asked for, else Faust's own."""
    return json_logging_config(settings.log_level) if settings.log_json else None
