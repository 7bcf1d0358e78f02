"""Client keys: `GATEWAY_API_KEYS` (comma-separated), sent as `Authorization: Bearer <key>`.

Each entry is `name:key` (the name is what usage, limits, logs and the dashboard show) or a
plain `key` (the old form; its name is its key id: `key_` + the first 8 hex digits of the
key's sha256). No keys configured = an open gateway (every caller is "anonymous"). Keys are
compared in constant time against every configured key; the rest of the gateway sees the
name, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

from gateway.errors import AuthenticationFailed
from gateway.settings import split_client_key

ANONYMOUS = "anonymous"


def key_id(secret: str) -> str:
    return "key_" + hashlib.sha256(secret.encode()).hexdigest()[:8]


class ClientKeys:
    def __init__(self, keys: list[SecretStr]):
        self._keys: list[tuple[bytes, str]] = []
        for entry in keys:
            name, secret = split_client_key(entry.get_secret_value())
            self._keys.append((secret.encode(), name or key_id(secret)))

    @property
    def open(self) -> bool:
        return not self._keys

    def authenticate(self, authorization: str | None) -> str:
        """The caller's name; AuthenticationFailed (401) when the key is missing or unknown."""
        if not self._keys:
            return ANONYMOUS
        if not authorization:
            raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("the Authorization header must be 'Bearer <key>'")
        given = token.encode()
        found = None
        for secret, kid in self._keys:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(secret, given):
                found = kid
        if found is None:
            raise AuthenticationFailed("invalid API key")
        return found
