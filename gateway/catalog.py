"""pricing.yaml → a validated `Catalog` of models and their routes.

Validation happens once, at start; every error names the file and the field
(`pricing.yaml: models.wizardlm-2-8x22b.routes[1].input: ...`). Prices are USD per 1M tokens.
Run-time price overrides (admin page) live in the stats store, not here: the catalog is the
file's truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from gateway.settings import Settings

ProviderKind = Literal["openai_compat", "local"]


class CatalogError(ValueError):
    """pricing.yaml is missing or invalid; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderLimits(_Strict):
    max_n: int | None = Field(None, ge=1)
    max_stop: int | None = Field(None, ge=0)
    default_max_tokens: int | None = Field(None, ge=1)


class ProviderSpec(_Strict):
    kind: ProviderKind = "openai_compat"
    base_url: str | None = None
    optional_headers: list[str] = Field(default_factory=list)
    strip_text: list[str] = Field(default_factory=list)
    limits: ProviderLimits = ProviderLimits()
    unsupported_params: list[str] = Field(default_factory=list)
    # local only: price = gpu_cost_per_hour / measured tokens per second
    gpu_cost_per_hour: float | None = Field(None, ge=0)
    tokens_per_s: float | None = Field(None, gt=0)
    fallback_of_last_resort: bool = False

    @model_validator(mode="after")
    def _check_kind(self) -> ProviderSpec:
        if self.kind == "openai_compat" and not self.base_url:
            raise ValueError("base_url is required for an openai_compat provider")
        if self.kind == "local" and (self.gpu_cost_per_hour is None or self.tokens_per_s is None):
            raise ValueError("a local provider needs gpu_cost_per_hour and tokens_per_s")
        return self


class RouteSpec(_Strict):
    provider: str
    slug: str
    input: float | None = Field(None, ge=0, description="USD per 1M prompt tokens")
    output: float | None = Field(None, ge=0, description="USD per 1M completion tokens")
    context: int | None = Field(None, gt=0)
    max_output: int | None = Field(None, gt=0)
    unsupported_params: list[str] = Field(default_factory=list)


class ModelSpec(_Strict):
    display_name: str | None = None
    aliases: list[str] = Field(default_factory=list)
    tokenizer: Literal["v1", "v3"]
    chat_format: Literal["vicuna", "mistral_v3"]
    weights: str
    context: int = Field(gt=0)
    routes: list[RouteSpec] = Field(min_length=1)


class CatalogSpec(_Strict):
    providers: dict[str, ProviderSpec]
    models: dict[str, ModelSpec] = Field(min_length=1)

    @field_validator("providers")
    @classmethod
    def _printable_names(cls, providers: dict[str, ProviderSpec]) -> dict[str, ProviderSpec]:
        for name in providers:  # they go into response headers as they are
            if not (name.isascii() and name.isprintable() and name.strip()):
                raise ValueError(f"provider name {name!r}: must be printable ASCII")
        return providers


@dataclass(frozen=True, slots=True)
class Route:
    """One way to serve one model: a provider, its slug, its prices and limits."""

    id: str  # "provider/slug"
    provider: str
    kind: ProviderKind
    model: str  # our canonical model id
    slug: str
    input_price: float  # USD / 1M prompt tokens
    output_price: float  # USD / 1M completion tokens
    context: int
    max_output: int | None
    unsupported_params: frozenset[str]
    weights: str  # routes with equal weights may continue each other's streams
    last_resort: bool = False

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_price + completion_tokens * self.output_price) / 1e6


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    display_name: str
    aliases: tuple[str, ...]
    tokenizer: str
    chat_format: str
    weights: str
    context: int
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class Catalog:
    models: dict[str, Model]
    providers: dict[str, ProviderSpec]
    source: str
    _by_name: dict[str, str]

    def resolve(self, name: str) -> Model | None:
        """A model by id or alias, case-insensitively; None when unknown."""
        model_id = self._by_name.get(name.lower())
        return self.models[model_id] if model_id else None

    def routes(self) -> list[Route]:
        return [route for model in self.models.values() for route in model.routes]


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _local_price(spec: ProviderSpec) -> float:
    assert spec.gpu_cost_per_hour is not None and spec.tokens_per_s is not None
    return spec.gpu_cost_per_hour / (spec.tokens_per_s * 3600.0) * 1e6


def build_catalog(data: Any, source: str = "pricing.yaml") -> Catalog:
    try:
        spec = CatalogSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CatalogError(f"{source}: {_format_loc(first['loc'])}: {first['msg']}") from None

    models: dict[str, Model] = {}
    by_name: dict[str, str] = {}
    for model_id, m in spec.models.items():
        routes = []
        for i, r in enumerate(m.routes):
            where = f"{source}: models.{model_id}.routes[{i}]"
            provider = spec.providers.get(r.provider)
            if provider is None:
                raise CatalogError(f"{where}.provider: unknown provider {r.provider!r}")
            if not (r.slug.isascii() and r.slug.isprintable() and r.slug.strip()):
                # route ids go into response headers as they are (api/direct_response.py)
                raise CatalogError(f"{where}.slug: must be printable ASCII, got {r.slug!r}")
            if provider.kind == "local":
                inp = out = _local_price(provider) if r.input is None else r.input
                if r.output is not None:
                    out = r.output
            else:
                if r.input is None or r.output is None:
                    raise CatalogError(f"{where}: input and output prices are required")
                inp, out = r.input, r.output
            context = r.context or m.context
            if context > m.context:
                raise CatalogError(f"{where}.context: {context} exceeds the model's {m.context}")
            routes.append(
                Route(
                    id=f"{r.provider}/{r.slug}",
                    provider=r.provider,
                    kind=provider.kind,
                    model=model_id,
                    slug=r.slug,
                    input_price=inp,
                    output_price=out,
                    context=context,
                    max_output=r.max_output,
                    unsupported_params=frozenset(r.unsupported_params)
                    | frozenset(provider.unsupported_params),
                    weights=m.weights,
                    last_resort=provider.fallback_of_last_resort,
                )
            )
        ids = [route.id for route in routes]
        if len(set(ids)) != len(ids):
            raise CatalogError(f"{source}: models.{model_id}.routes: duplicate route {ids}")
        models[model_id] = Model(
            id=model_id,
            display_name=m.display_name or model_id,
            aliases=tuple(m.aliases),
            tokenizer=m.tokenizer,
            chat_format=m.chat_format,
            weights=m.weights,
            context=m.context,
            routes=tuple(routes),
        )
        for name in (model_id, *m.aliases):
            owner = by_name.setdefault(name.lower(), model_id)
            if owner != model_id:
                raise CatalogError(
                    f"{source}: models.{model_id}.aliases: {name!r} already names {owner}"
                )
    return Catalog(models=models, providers=dict(spec.providers), source=source, _by_name=by_name)


def load_catalog(path: Path | str) -> Catalog:
    """Every way the file can be wrong is one line naming the file and the problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CatalogError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        raise CatalogError(f"{path}: the file is empty (expected `providers:` and `models:`)")
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise CatalogError(f"{path}: the top level must be a mapping, not a {kind}")
    return build_catalog(data, source=str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where (1-based)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def with_local_backend(
    catalog: Catalog,
    *,
    context: int | None = None,
    gpu_cost_per_hour: float | None = None,
    tokens_per_s: float | None = None,
) -> Catalog:
    """The catalog with the local routes' context and price taken from how the backend runs.

    A local route's context is what its KV cache allows (LOCAL_MAX_SEQ_LEN), not the model's
    64k; its price is the GPU's cost per hour over its measured throughput. Either, when given,
    replaces pricing.yaml's value, so routing and `gateway cheapest` see the same numbers.
    """
    if context is None and gpu_cost_per_hour is None and tokens_per_s is None:
        return catalog
    providers = dict(catalog.providers)
    for name, spec in catalog.providers.items():
        if spec.kind == "local":
            updates: dict[str, float] = {}
            if gpu_cost_per_hour is not None:
                updates["gpu_cost_per_hour"] = gpu_cost_per_hour
            if tokens_per_s is not None:
                updates["tokens_per_s"] = tokens_per_s
            providers[name] = spec.model_copy(update=updates)
    models = {}
    for model_id, model in catalog.models.items():
        routes = []
        for route in model.routes:
            if route.kind == "local":
                price = _local_price(providers[route.provider])
                route = replace(
                    route,
                    input_price=price,
                    output_price=price,
                    context=min(context or route.context, route.context),
                )
            routes.append(route)
        models[model_id] = replace(model, routes=tuple(routes))
    return replace(catalog, models=models, providers=providers)


def load_configured_catalog(settings: Settings) -> Catalog:
    """pricing.yaml as this deployment runs it: the file, plus the local backend's settings."""
    local = settings.local_model_dir is not None or settings.local_base_url is not None
    context = settings.local_max_seq_len if local else None
    if context is not None and settings.local_model_dir is not None:
        # the in-process backend clamps to its model's context: route with the same figure
        context = min(context, _model_context(settings.local_model_dir) or context)
    return with_local_backend(
        load_catalog(settings.gateway_config),
        context=context,
        gpu_cost_per_hour=settings.local_gpu_cost_per_hour,
        tokens_per_s=settings.local_tokens_per_s,
    )


def _model_context(model_dir: Path) -> int | None:
    """max_position_embeddings of a Hugging Face folder's config.json (None if unreadable:
    the backend's own load reports that)."""
    try:
        value = json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and value > 0 else None
