"""The one settings class. Nothing else in the gateway reads the environment.

Each hosted provider takes `<PROVIDER>_API_KEY` (a route is a candidate only when its key is
set) and `<PROVIDER>_BASE_URL` (overrides pricing.yaml's base URL; tests point it at fakes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from providers.base import PhaseTimeouts

# Shipped inside the package (package data): `pip install .` then `gateway routes` works.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "pricing.yaml"
HOSTED_PROVIDERS = ("lepton", "novita", "openrouter", "deepinfra")


_KEY_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class ClientLimit(BaseModel):
    """One client's limits (None: unlimited). Enforced across replicas through Redis."""

    model_config = ConfigDict(extra="forbid")

    requests_per_min: int | None = Field(None, ge=1)
    tokens_per_min: int | None = Field(None, ge=1)
    daily_budget_usd: float | None = Field(None, gt=0)

    @property
    def unlimited(self) -> bool:
        return (self.requests_per_min, self.tokens_per_min, self.daily_budget_usd) == (None,) * 3


def split_client_key(entry: str) -> tuple[str | None, str]:
    """`name:key` -> (name, key); a plain `key` (the old form) -> (None, key)."""
    name, sep, key = entry.partition(":")
    if sep and key and _KEY_NAME.fullmatch(name):
        return name, key
    return None, entry


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True)

    # where things are
    gateway_config: Path = Field(DEFAULT_CONFIG, description="pricing.yaml path")
    redis_url: str | None = None  # absent = in-memory stats
    stats_prefix: str = "moegw:"
    stats_flush_interval_s: float = 0.5
    stats_max_pending: int = 100_000
    request_log_size: int = Field(500, ge=0, le=100_000)  # the dashboard's log; 0 = off

    # who may call (no client keys = an open gateway); entries `name:key` or a plain `key`
    gateway_api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # per-client limits (requests/min, tokens/min, USD per UTC day): the defaults for every
    # client, and overrides by key name as JSON, e.g. {"alice": {"daily_budget_usd": 5}}
    client_requests_per_min: int | None = Field(None, ge=1)
    client_tokens_per_min: int | None = Field(None, ge=1)
    client_daily_budget_usd: float | None = Field(None, gt=0)
    client_limits: Annotated[dict[str, ClientLimit], NoDecode] = Field(default_factory=dict)
    gateway_admin_token: SecretStr | None = None  # absent = /admin disabled
    # origins (https://gw.example.com) besides the Host header that may change admin state
    gateway_admin_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # hosted providers: keys and base-URL overrides
    lepton_api_key: SecretStr | None = None
    lepton_base_url: str | None = None
    novita_api_key: SecretStr | None = None
    novita_base_url: str | None = None
    openrouter_api_key: SecretStr | None = None
    openrouter_base_url: str | None = None
    openrouter_referer: str | None = None  # sent as HTTP-Referer
    openrouter_title: str | None = None  # sent as X-Title
    deepinfra_api_key: SecretStr | None = None
    deepinfra_base_url: str | None = None

    # the local backend: in-process (model dir) or over HTTP (base URL)
    local_model_dir: Path | None = None
    local_base_url: str | None = None
    local_api_key: SecretStr | None = None
    local_device: str = "auto"
    local_dtype: str = "auto"
    local_max_slots: int = 8
    local_max_seq_len: int = 4096
    local_queue_size: int = 32
    local_gpu_cost_per_hour: float | None = None  # overrides pricing.yaml's local price
    local_tokens_per_s: float | None = None  # measured throughput used for the price

    # limits and timeouts
    max_body_bytes: int = 4 * 1024 * 1024
    timeout_connect_s: float = 5.0
    timeout_headers_s: float = 30.0
    timeout_first_token_s: float = 60.0
    timeout_gap_s: float = 30.0
    timeout_total_s: float = 600.0
    retry_attempts_per_route: int = 2  # attempts on one route before falling back
    retry_budget_s: float = 20.0  # total time spent backing off within one request
    retry_backoff_base_s: float = 0.2
    retry_after_cap_s: float = 10.0  # longer Retry-After: fall back instead of waiting
    max_fallback_routes: int = 5
    # One deadline per request: every attempt, backoff and stream read draws from it (an
    # attempt's own total is cut to what is left). The default bounds a request whose routes
    # all stall to 5 minutes; a stream still being served when it passes ends with an error.
    request_deadline_s: float = Field(300.0, gt=0)
    # Request bodies: JSON nested deeper than this is a 400 before anything parses it (the
    # upstream encoder gives up near 255 levels; no OpenAI field needs more than a few dozen).
    max_body_depth: int = Field(64, ge=2, le=200)
    # What an upstream may send (over a limit: the upstream's protocol error, fail over).
    upstream_max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # a non-stream answer
    upstream_max_decompressed_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # gzip/deflate
    upstream_max_header_bytes: int = Field(64 * 1024, ge=1024)  # status line + headers
    upstream_max_sse_line_bytes: int = Field(1024 * 1024, ge=1024)  # one stream event
    # Usage counted by the gateway (an upstream reported none): the first N characters are
    # tokenized (in a worker thread) and the rest extrapolated; such usage is flagged estimated.
    usage_count_max_chars: int = Field(256 * 1024, ge=1024)

    # serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # warning: uvicorn's access log (on at info) cost ~1.4x a request's CPU (api/serving.py)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "warning"
    log_format: Literal["text", "json"] = "text"  # json: one object per line
    # what one process lets clients hold (gateway/api/server_limits.py documents each answer)
    server_header_timeout_s: float = Field(10.0, gt=0)  # request line + headers, from the start
    server_body_timeout_s: float = Field(30.0, gt=0)  # the body, from the end of the headers
    server_keepalive_timeout_s: float = Field(5.0, gt=0)  # an idle keep-alive connection
    server_max_header_bytes: int = Field(32 * 1024, ge=1024)  # request line + headers: 431
    server_max_header_count: int = Field(100, ge=8)  # header fields: 431
    server_max_connections: int = Field(2048, ge=1)  # open per process: 503 + Retry-After
    server_max_inflight_requests: int = Field(512, ge=1)  # per process: 503 + Retry-After
    server_retry_after_s: int = Field(1, ge=1)  # the Retry-After of those 503s
    workers: int = Field(1, ge=1)  # gateway processes; share their state through REDIS_URL
    # Python's young-generation GC threshold in a served process (0: Python's default, 700);
    # the startup objects are frozen out of every collection (api/gc_tuning.py).
    gc_gen0_threshold: int = Field(10_000, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: object) -> object:
        # docker-compose passes `KEY: ${KEY:-}` as an empty string: treat it as not set.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(v, str) and v == "")}
        return data

    @field_validator("gateway_api_keys", "gateway_admin_origins", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("client_limits", mode="before")
    @classmethod
    def _json_limits(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("must be a JSON object: key name -> limits") from None
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def default_client_limit(self) -> ClientLimit:
        """Every client's limits unless CLIENT_LIMITS names it."""
        return ClientLimit(
            requests_per_min=self.client_requests_per_min,
            tokens_per_min=self.client_tokens_per_min,
            daily_budget_usd=self.client_daily_budget_usd,
        )

    @property
    def limits_configured(self) -> bool:
        return not self.default_client_limit.unlimited or any(
            not limit.unlimited for limit in self.client_limits.values()
        )

    def provider_key(self, provider: str) -> str | None:
        secret = getattr(self, f"{provider}_api_key", None)
        return secret.get_secret_value() if secret else None

    def provider_base_url(self, provider: str) -> str | None:
        value = getattr(self, f"{provider}_base_url", None)
        return value if isinstance(value, str) else None

    @property
    def timeouts(self) -> PhaseTimeouts:
        return PhaseTimeouts(
            connect=self.timeout_connect_s,
            headers=self.timeout_headers_s,
            first_token=self.timeout_first_token_s,
            gap=self.timeout_gap_s,
            total=self.timeout_total_s,
        )

    def secrets(self) -> tuple[str, ...]:
        """Every configured secret, for log/response redaction."""
        values = [split_client_key(k.get_secret_value())[1] for k in self.gateway_api_keys]
        for name in (*HOSTED_PROVIDERS, "local"):
            key = self.provider_key(name)
            if key:
                values.append(key)
        if self.gateway_admin_token:
            values.append(self.gateway_admin_token.get_secret_value())
        return tuple(values)
