"""The gateway's logging: one format, and every record scrubbed of secrets before it is written.

    configure_logging(settings.log_level, settings.secrets())   # create_app's lifespan

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

import logging
import re
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


def configure_logging(level: str, secrets: tuple[str, ...]) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
    for name in ("gateway", "providers"):
        logging.getLogger(name).setLevel(level.upper())
    install_redaction(secrets)
