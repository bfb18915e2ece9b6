"""How the supervisor's own log records look: text (default) or one JSON object per line.

Records about one rank carry ``extra={"rank": n}``; the JSON form has it as a field, so a log
pipeline can group by rank without parsing messages.
"""

from __future__ import annotations

import datetime
import json
import logging

__all__ = ["TEXT_FORMAT", "JsonFormatter", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"time": ISO 8601 UTC, "level", "logger", "rank" (where there is one), "message"}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
        }
        rank = getattr(record, "rank", None)
        if rank is not None:
            entry["rank"] = rank
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """Send our records to stderr, as text or JSON; quiet the libraries' per-request lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level, handlers=[handler])
    # One line per probe from httpx, and hypercorn's banner, would drown the ranks' events.
    for noisy in ("httpx", "httpcore", "hypercorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
