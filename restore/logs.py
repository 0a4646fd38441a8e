"""Log output of the `restore` command: text lines or JSON lines.

JSON lines carry one object per record: ``ts`` (UTC, ISO 8601 with
milliseconds), ``level``, ``logger``, ``msg`` (the formatted message), and
the structured fields the code attaches with ``extra=`` (``event``,
``session``, ``pid``, ``snapshot``, counts...), plus ``exc`` with the
traceback when there is one. Text lines are ``restore: <message>``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Optional, TextIO

FORMATS = ("text", "json")
# Attributes every LogRecord has; anything else came from extra=.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonLines(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(fmt: str = "text", verbose: bool = False, stream: Optional[TextIO] = None) -> None:
    """Send the package's log records to stream (default stderr) as fmt
    ("text" or "json"). Warnings and errors always; session starts and ends
    (INFO) when verbose. The "restore.serve" logger (the server's own start
    and stop) logs at INFO either way."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter("restore: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("restore.serve").setLevel(logging.INFO)
