"""The gateway's logging: text or JSON lines, and every record scrubbed of secrets.

    configure_logging(settings.log_level, settings.secrets(), settings.log_format)  # lifespan
    log_event(log, logging.WARNING, "upstream_attempt_failed", route=..., status=401, ...)

`log_event` writes one structured line: as text, `event key=value ...`; as JSON (`LOG_FORMAT=
json`), one object per line with `ts`, `level`, `logger`, `event`, the fields, and `msg`. With
JSON every handler of the root and uvicorn loggers (access lines included) writes JSON.

`RedactingFilter` applies `errors.redact` with the configured secrets (provider keys, client
keys, admin token) plus the credential patterns to a record's message and traceback text. It
runs twice over: attached to every handler of the root and uvicorn loggers, and — because a
handler added later (or a filter on a parent logger) would not see every record — at record
creation, through the log-record factory, so no record in the process escapes it.

URLs are read as a server reads them: `?key=KEY%5Fabc` is the secret `KEY_abc`, so query strings
and percent-encoded text are decoded before they are checked (`redact_url_text`): a query value
whose name says credential (key, token, secret, password, signature, ...) or whose decoded text
holds a secret is replaced by [redacted]; the rest of the line is left as it was (still encoded,
so a decoded newline can never forge a log line).
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

from gateway.errors import redact

_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SECRETS: set[str] = set()  # every secret any app in this process was configured with


_QUERY_PAIR = re.compile(r"([?&;])([^=&;#\s\"'<>]+)=([^&;#\s\"'<>]*)")
_ENCODED_RUN = re.compile(r"[^\s\"'<>]*%[0-9A-Fa-f]{2}[^\s\"'<>]*")
_CREDENTIAL_NAMES = frozenset(
    {"key", "apikey", "auth", "authorization", "token", "secret", "password", "passwd", "pwd"}
    | {"sig", "signature", "session", "sessionid", "credential", "credentials"}
)
_CREDENTIAL_SUFFIXES = ("_key", "_token", "_secret", "_password", "_signature", "_sig")
_KEEP_ENCODED = "/?&=:;,@!$'()*+[]~"  # re-encoding a redacted run leaves these (and [redacted])


def _decoded(text: str, plus: bool = False) -> str:
    """Percent-decoded twice at most: `%254B` is `%4B` is `K` to a lenient server."""
    for _ in range(2):
        once = unquote_plus(text) if plus else unquote(text)
        if once == text:
            break
        text = once
    return text


def _credential_name(name: str) -> bool:
    name = _decoded(name, plus=True).strip().lower().replace("-", "_")
    bare = name.replace("_", "")
    return bare in _CREDENTIAL_NAMES or name.endswith(_CREDENTIAL_SUFFIXES)


def redact_url_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Query-string values and percent-encoded runs in `text`, redacted after decoding."""
    if "=" in text and ("?" in text or "&" in text):

        def pair(match: re.Match[str]) -> str:
            sep, name, value = match.groups()
            if value:
                decoded = _decoded(value, plus=True)
                if _credential_name(name) or redact(decoded, secrets) != decoded:
                    return f"{sep}{name}=[redacted]"
            return match.group(0)

        text = _QUERY_PAIR.sub(pair, text)
    if "%" in text:

        def run(match: re.Match[str]) -> str:
            decoded = _decoded(match.group(0))
            cleaned = redact(decoded, secrets)
            return match.group(0) if cleaned == decoded else quote(cleaned, safe=_KEEP_ENCODED)

        text = _ENCODED_RUN.sub(run, text)
    return text


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """A log line's text with every secret gone: encoded in a URL, or as is."""
    return redact(redact_url_text(text, secrets), secrets)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):
            return True
        secrets = tuple(_SECRETS)
        if isinstance(record.msg, str):
            record.msg = scrub(record.msg, secrets)
        else:
            record.msg = scrub(str(record.msg), secrets)
        # Arguments are redacted one by one (uvicorn's access formatter unpacks them); objects
        # become their redacted text, since their str() could carry a secret.
        if isinstance(record.args, tuple):
            record.args = tuple(_scrub(arg, secrets) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _scrub(v, secrets) for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, secrets)
        record._redacted = True  # type: ignore[attr-defined]
        return True


def _scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return scrub(value if isinstance(value, str) else str(value), secrets)


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


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the whole line is redacted once more before it leaves."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        event = getattr(record, "event", None)
        if event is not None:
            data["event"] = event
            data.update(getattr(record, "fields", {}))
        data["msg"] = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        return scrub(json.dumps(data, default=str, ensure_ascii=False), tuple(_SECRETS))


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """One structured line: `event k=v ...` as text, the fields as keys in JSON."""
    if not logger.isEnabledFor(level):
        return
    present = {k: v for k, v in fields.items() if v is not None}
    text = " ".join([event, *(f"{k}={_text(v)}" for k, v in present.items())])
    logger.log(level, "%s", text, extra={"event": event, "fields": present})


def configure_logging(level: str, secrets: tuple[str, ...], log_format: str = "text") -> None:
    root = logging.getLogger()
    if not root.handlers:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(stream)
    if log_format == "json":
        formatter = JsonFormatter()
        for name in _LOGGERS:
            for handler in logging.getLogger(name).handlers:
                handler.setFormatter(formatter)
    for name in ("gateway", "providers"):
        logging.getLogger(name).setLevel("DEBUG" if level.lower() == "trace" else level.upper())
    # The start-up summary (live routes, and why the others are not) is one line an operator
    # needs whatever the level: the default level is warning (issue 13: the access log's cost).
    if logging.getLogger("gateway.startup").getEffectiveLevel() > logging.INFO:
        logging.getLogger("gateway.startup").setLevel(logging.INFO)
    install_redaction(secrets)
