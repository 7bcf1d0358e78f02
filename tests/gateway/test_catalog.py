"""pricing.yaml → Catalog: the shipped file, and bad files whose errors name file and field."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.catalog import CatalogError, build_catalog, load_catalog
from gateway.routing.tokens import PromptCounter
from gateway.settings import DEFAULT_CONFIG
from tests.gateway.routing_fixtures import MIXTRAL, WIZARD, make_router, small_catalog_data

# The design table (shared/design.md, from the providers' pages): route -> ($/1M in, out, context)
DESIGN_PRICES = {
    "lepton/wizardlm-2-8x22b": (0.50, 0.50, 65536),
    "novita/microsoft/wizardlm-2-8x22b": (0.62, 0.62, 65536),
    "openrouter/microsoft/wizardlm-2-8x22b": (0.48, 0.48, 65536),
    "deepinfra/microsoft/WizardLM-2-8x22B": (0.65, 0.65, 65536),
    "openrouter/mistralai/mixtral-8x22b-instruct": (0.40, 1.20, 65536),
}


def test_shipped_catalog_matches_the_design_table() -> None:
    catalog = load_catalog(DEFAULT_CONFIG)
    routes = {r.id: r for r in catalog.routes()}
    for route_id, (inp, out, context) in DESIGN_PRICES.items():
        route = routes[route_id]
        assert (route.input_price, route.output_price, route.context) == (inp, out, context)
        assert route.id == f"{route.provider}/{route.slug}"
    assert catalog.models[WIZARD].tokenizer == "v1"
    assert catalog.models[MIXTRAL].tokenizer == "v3"
    local = routes["local/wizardlm-2-8x22b"]
    spec = catalog.providers["local"]
    assert spec.gpu_cost_per_hour is not None and spec.tokens_per_s is not None
    per_m = spec.gpu_cost_per_hour / (spec.tokens_per_s * 3600) * 1e6
    assert local.input_price == pytest.approx(per_m) and local.last_resort
    assert catalog.providers["deepinfra"].limits.max_n == 2
    assert catalog.providers["deepinfra"].limits.max_stop == 16
    assert catalog.providers["deepinfra"].limits.default_max_tokens == 512


def test_route_cost_is_per_million_tokens() -> None:
    route = next(r for r in load_catalog(DEFAULT_CONFIG).routes() if r.id.endswith("instruct"))
    assert route.cost(1_000_000, 0) == pytest.approx(0.40)
    assert route.cost(2000, 500) == pytest.approx((2000 * 0.40 + 500 * 1.20) / 1e6)


def test_aliases_resolve_case_insensitively() -> None:
    catalog = load_catalog(DEFAULT_CONFIG)
    for model in catalog.models.values():
        for name in (model.id, *model.aliases):
            for spelling in (name, name.upper(), name.lower()):
                resolved = catalog.resolve(spelling)
                assert resolved is not None and resolved.id == model.id
    assert catalog.resolve("gpt-4") is None
    assert catalog.resolve("microsoft/wizardlm-2-8x22b") is catalog.models[WIZARD]


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "bad-pricing.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _mutated(change: Any) -> dict[str, Any]:
    data = small_catalog_data()
    change(data)
    return data


def _route(data: dict[str, Any], i: int = 0) -> dict[str, Any]:
    route: dict[str, Any] = data["models"]["small"]["routes"][i]
    return route


BAD_FILES = [
    (lambda d: _route(d).update(input=-1), "models.small.routes[0].input"),
    (lambda d: _route(d).update(inptu=0.5), "models.small.routes[0].inptu"),
    (lambda d: _route(d).update(provider="together"), "models.small.routes[0].provider"),
    (lambda d: _route(d).pop("output"), "models.small.routes[0]: input and output"),
    (lambda d: _route(d).update(context=5000), "models.small.routes[0].context"),
    (lambda d: d["models"]["small"].pop("tokenizer"), "models.small.tokenizer"),
    (lambda d: d["models"]["small"].update(tokenizer="v2"), "models.small.tokenizer"),
    (lambda d: d["models"]["small"].update(routes=[]), "models.small.routes"),
    (lambda d: d["providers"]["lepton"].pop("base_url"), "providers.lepton"),
    (lambda d: d["providers"]["local"].pop("tokens_per_s"), "providers.local"),
    (
        lambda d: d["providers"]["deepinfra"]["limits"].update(max_n=0),
        "providers.deepinfra.limits.max_n",
    ),
    (
        lambda d: d["models"]["small"]["routes"].append(copy.deepcopy(_route(d))),
        "models.small.routes: duplicate",
    ),
    (
        lambda d: d["models"]["small-long"].update(aliases=["ORG/small-model"]),
        "models.small-long.aliases",
    ),
    (lambda d: d.update(models={}), "models"),
    # names that go into response headers: printable ASCII only (no header injection)
    (lambda d: _route(d).update(slug="evil\r\nset-cookie: x"), "models.small.routes[0].slug"),
    (lambda d: _route(d).update(slug="wizardlm-ü"), "models.small.routes[0].slug"),
    (lambda d: d["providers"].update({"bad\nname": d["providers"]["lepton"]}), "providers"),
]


@pytest.mark.parametrize(("change", "field"), BAD_FILES)
def test_bad_file_error_names_the_file_and_the_field(
    tmp_path: Path, change: Any, field: str
) -> None:
    path = _write(tmp_path, _mutated(change))
    with pytest.raises(CatalogError) as exc:
        load_catalog(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: "), message
    assert field in message, message


def test_unknown_provider_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, _mutated(lambda d: _route(d, 1).update(provider="together")))
    with pytest.raises(CatalogError, match=r"routes\[1\]\.provider: unknown provider 'together'"):
        load_catalog(path)


def test_unreadable_or_unparsable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(CatalogError, match=f"^{re.escape(str(missing))}: cannot read"):
        load_catalog(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed\n")
    with pytest.raises(CatalogError, match=f"^{re.escape(str(broken))}: not valid YAML"):
        load_catalog(broken)
    with pytest.raises(CatalogError, match=r"^inline: "):
        build_catalog(["not", "a", "mapping"], source="inline")


def test_a_tokenizer_the_chat_format_cannot_use_is_a_config_error() -> None:
    data = small_catalog_data()
    data["models"]["small"]["tokenizer"] = "v3"  # vicuna is WizardLM-2's v1 format
    catalog = build_catalog(data, source="mismatch.yaml")
    with pytest.raises(CatalogError, match=r"^mismatch\.yaml: models\.small: .*v1"):
        make_router(catalog, counter=PromptCounter())
