"""The gateway's logging: one format, and every record scrubbed of secrets before it is written.

    configure_logging(settings.log_level, settings.secrets())   # create_app's lifespan

`RedactingFilter` applies `errors.redact` with the configured secrets (provider keys, client
keys, admin token) plus the credential patterns to a record's message and traceback text. It
runs twice over: attached to every handler of the root and uvicorn loggers, and — because a
handler added later (or a filter on a parent logger) would not see every record — at record
creation, through the log-record factory, so no record in the process escapes it.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.errors import redact

_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SECRETS: set[str] = set()  # every secret any app in this process was configured with


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):
            return True
        secrets = tuple(_SECRETS)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, secrets)
        else:
            record.msg = redact(str(record.msg), secrets)
        # Arguments are redacted one by one (uvicorn's access formatter unpacks them); objects
        # become their redacted text, since their str() could carry a secret.
        if isinstance(record.args, tuple):
            record.args = tuple(_scrub(arg, secrets) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _scrub(v, secrets) for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, secrets)
        record._redacted = True  # type: ignore[attr-defined]
        return True


def _scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(value if isinstance(value, str) else str(value), secrets)


_FILTER = RedactingFilter()


def _install_record_factory() -> None:
    current = logging.getLogRecordFactory()
    if getattr(current, "_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        _FILTER.filter(record)
        return record

    factory._redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def install_redaction(secrets: tuple[str, ...]) -> None:
    _SECRETS.update(s for s in secrets if s)
    _install_record_factory()
    for name in _LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def configure_logging(level: str, secrets: tuple[str, ...]) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
    for name in ("gateway", "providers"):
        logging.getLogger(name).setLevel(level.upper())
    install_redaction(secrets)
