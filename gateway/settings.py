"""The one settings class. Nothing else in the gateway reads the environment.

Each hosted provider takes `<PROVIDER>_API_KEY` (a route is a candidate only when its key is
set) and `<PROVIDER>_BASE_URL` (overrides pricing.yaml's base URL; tests point it at fakes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from providers.base import PhaseTimeouts

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "pricing.yaml"
HOSTED_PROVIDERS = ("lepton", "novita", "openrouter", "deepinfra")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True)

    # where things are
    gateway_config: Path = Field(DEFAULT_CONFIG, description="pricing.yaml path")
    redis_url: str | None = None  # absent = in-memory stats
    stats_prefix: str = "moegw:"
    stats_flush_interval_s: float = 0.5
    stats_max_pending: int = 100_000

    # who may call (no client keys = an open gateway)
    gateway_api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    gateway_admin_token: SecretStr | None = None  # absent = /admin disabled

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

    # serving
    host: str = "127.0.0.1"
    port: int = 8000
    # warning: uvicorn's access log (on at info) cost ~1.4x a request's CPU (api/serving.py)
    log_level: str = "warning"
    workers: int = Field(1, ge=1)  # gateway processes; share their state through REDIS_URL

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: object) -> object:
        # docker-compose passes `KEY: ${KEY:-}` as an empty string: treat it as not set.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(v, str) and v == "")}
        return data

    @field_validator("gateway_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

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
        values = [k.get_secret_value() for k in self.gateway_api_keys]
        for name in (*HOSTED_PROVIDERS, "local"):
            key = self.provider_key(name)
            if key:
                values.append(key)
        if self.gateway_admin_token:
            values.append(self.gateway_admin_token.get_secret_value())
        return tuple(values)
