"""Client keys: `GATEWAY_API_KEYS` (comma-separated), sent as `Authorization: Bearer <key>`.
An entry may name its key, `name=key` (the dashboard shows the name); the key is what follows.

No keys configured = an open gateway (every caller is "anonymous"). Keys are compared in
constant time against every configured key; what the rest of the gateway sees is a key id
(`key_` + the first 8 hex digits of the key's sha256), never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

from gateway.errors import AuthenticationFailed

ANONYMOUS = "anonymous"


def key_id(secret: str) -> str:
    return "key_" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def split_named(entry: str) -> tuple[str | None, str]:
    """`name=key` -> (name, key); a plain key -> (None, key)."""
    name, sep, key = entry.partition("=")
    if sep and name.strip() and key.strip() and " " not in name.strip():
        return name.strip(), key.strip()
    return None, entry


class ClientKeys:
    def __init__(self, keys: list[SecretStr]):
        named = [split_named(k.get_secret_value()) for k in keys]
        self._keys = [(secret.encode(), key_id(secret)) for _, secret in named]
        self._names = {key_id(secret): name for name, secret in named if name is not None}

    def names(self) -> dict[str, str]:
        """key id -> the name given in GATEWAY_API_KEYS (`name=key`), for display."""
        return dict(self._names)

    @property
    def open(self) -> bool:
        return not self._keys

    def authenticate(self, authorization: str | None) -> str:
        """The caller's key id; AuthenticationFailed (401) when the key is missing or unknown."""
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
