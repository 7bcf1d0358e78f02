"""The `gateway` console script, run as a real subprocess: cheapest, routes, serve, errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.catalog import load_catalog
from gateway.cli import main
from gateway.prices import PriceBook
from gateway.settings import DEFAULT_CONFIG, HOSTED_PROVIDERS
from gateway.stats import make_stats
from gateway.stats.base import Attempt
from tests.gateway.routing_fixtures import (
    DEEPINFRA,
    LEPTON,
    OPENROUTER,
    REDIS_URL,
    WIZARD,
    delete_prefix,
    redis_prefix,
    small_catalog_data,
)

REPO = Path(__file__).resolve().parents[2]


def gateway_cmd() -> list[str]:
    # the code of this checkout (an installed console script may point at another one);
    # tests/gateway/test_packaging.py runs the console script of a fresh wheel install
    return [sys.executable, "-m", "gateway.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """The runner's environment without any gateway setting, plus `extra`."""
    prefixes = tuple(f"{p.upper()}_" for p in (*HOSTED_PROVIDERS, "local", "gateway", "redis"))
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(prefixes)}
    env.pop("STATS_PREFIX", None)
    return {**env, "GATEWAY_CONFIG": str(DEFAULT_CONFIG), **extra}


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*gateway_cmd(), *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def cheapest_json(*args: str, **env: str) -> dict[str, Any]:
    done = run("cheapest", "--json", *args, **env)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


KEYS = {"LEPTON_API_KEY": "k-lepton", "DEEPINFRA_API_KEY": "k-deepinfra"}


def test_cheapest_json_ranks_by_cost_for_the_mix() -> None:
    out = cheapest_json(
        "--model", "WizardLM-2", "--prompt-tokens", "3000", "--max-tokens", "400", **KEYS
    )
    catalog = load_catalog(DEFAULT_CONFIG)
    routes = {r.id: r for r in catalog.models[WIZARD].routes}
    assert out["model"] == WIZARD
    assert [r["route"] for r in out["routes"]] == sorted(
        routes, key=lambda rid: (routes[rid].cost(3000, 400), rid)
    )
    for row in out["routes"]:
        assert row["cost_usd"] == pytest.approx(routes[row["route"]].cost(3000, 400))
        assert row["fits"] is True
        assert row["available"] is (row["provider"] in {"lepton", "deepinfra"})
        assert set(row["uptime"]) == {"5m", "30m", "1d"}
    assert out["routes"][0]["route"] == OPENROUTER  # cheapest, but no key ...
    assert out["best"] == LEPTON  # ... so the cheapest usable one is lepton


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """`gateway ARGS` through gateway.cli.main in this process: (exit status, stdout, stderr)."""
    return make_in_process(monkeypatch, capsys)


def make_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    for name in list(os.environ):
        if name not in clean_env():
            monkeypatch.delenv(name)
    for name, value in {**clean_env(), **KEYS}.items():
        monkeypatch.setenv(name, value)

    def call(*args: str) -> tuple[int, str, str]:
        try:
            status = main(list(args))
        except SystemExit as exc:  # main() returns its status; this would be a bug
            status = -1 if exc.code is None else int(exc.code)
        out, err = capsys.readouterr()
        return status, out, err

    return call


def test_cheapest_context_fit_at_the_boundary_and_deepinfra_default(in_process: Any) -> None:
    def cheapest(*args: str) -> dict[str, Any]:
        status, out, err = in_process("cheapest", "--json", "--model", WIZARD, *args)
        assert status == 0, err
        result: dict[str, Any] = json.loads(out)
        return result

    context = 65536
    fits = cheapest("--prompt-tokens", str(context - 512), "--max-tokens", "512")
    assert all(r["fits"] for r in fits["routes"])
    over = cheapest("--prompt-tokens", str(context - 511), "--max-tokens", "512")
    assert not any(r["fits"] for r in over["routes"]) and over["best"] is None
    assert "exceeds the context of 65536" in over["routes"][0]["fit_error"]
    # no --max-tokens: DeepInfra reserves its default 512, the others what the context leaves
    default = cheapest("--prompt-tokens", "65100")
    fit = {r["route"]: r["fits"] for r in default["routes"]}
    assert fit[DEEPINFRA] is False and fit[LEPTON] is True
    assert default["best"] == LEPTON


def test_cheapest_table_and_routes_table(in_process: Any) -> None:
    status, out, _ = in_process(
        "cheapest", "--model", WIZARD, "--prompt-tokens", "1000", "--max-tokens", "100"
    )
    assert status == 0 and f"cheapest usable route: {LEPTON}" in out
    status, out, _ = in_process("routes")
    assert status == 0
    catalog = load_catalog(DEFAULT_CONFIG)
    ids = {route.id for route in catalog.routes()}
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1]}
    for route in catalog.routes():
        row = lines[route.id]  # route, in/out, context, status..., up 30m, up 1d
        assert row[1] == f"{route.input_price:.2f}/{route.output_price:.2f}"
        assert row[2] == f"{route.context:,}"
    assert lines[LEPTON][3] == "live" and lines[OPENROUTER][3:5] == ["no", "key"]
    assert "OPENROUTER_API_KEY" in out and len(ids & set(lines)) == len(ids)
    assert KEYS["LEPTON_API_KEY"] not in out
    status, out, _ = in_process("routes", "--json")
    listed = json.loads(out)["routes"]
    assert {r["route"]: r["configured"] for r in listed}[DEEPINFRA] is True


def _bad_config(tmp_path: Path) -> Path:
    data = small_catalog_data()
    data["models"]["small"]["routes"][0]["input"] = -3
    bad = tmp_path / "pricing.yaml"
    bad.write_text(yaml.safe_dump(data))
    return bad


def test_bad_config_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    bad = _bad_config(tmp_path)
    done = run("routes", "--config", str(bad))  # a real process: its exit status
    assert done.returncode == 2, done.stderr
    assert str(bad) in done.stderr and "models.small.routes[0].input" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_config_every_command_and_source(
    tmp_path: Path, in_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = _bad_config(tmp_path)
    for args in (("cheapest", "--model", "small", "--prompt-tokens", "1"), ("serve",)):
        status, _, err = in_process(*args, "--config", str(bad))
        assert status == 2, args
        assert str(bad) in err and "models.small.routes[0].input" in err
    monkeypatch.setenv("GATEWAY_CONFIG", str(bad))
    status, _, err = in_process("routes")
    assert status == 2 and "models.small.routes[0].input" in err
    status, _, err = in_process("routes", "--config", str(tmp_path / "nope.yaml"))
    assert status == 2 and "nope.yaml: cannot read" in err


def test_unknown_model_and_bad_arguments_exit_2(in_process: Any) -> None:
    status, _, err = in_process("cheapest", "--model", "gpt-4", "--prompt-tokens", "10")
    assert status == 2
    assert "'gpt-4' does not exist" in err and WIZARD in err
    assert in_process("cheapest", "--model", WIZARD, "--prompt-tokens", "-5")[0] == 2
    assert in_process("cheapest", "--prompt-tokens", "5")[0] == 2


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = redis_prefix()
    yield value
    await delete_prefix(value)


async def test_cheapest_sees_the_servers_overrides_and_uptime_in_redis(prefix: str) -> None:
    book = PriceBook(load_catalog(DEFAULT_CONFIG), redis_url=REDIS_URL, prefix=prefix)
    stats = make_stats(REDIS_URL, prefix=prefix)
    try:
        await book.set(DEEPINFRA, 0.01, 0.02)
        for i in range(5):  # what a server replica recorded: 4 of 5 lepton attempts succeeded
            stats.record_attempt(Attempt(LEPTON, ok=i != 0, latency_s=0.5, completion_tokens=10))
        await stats.flush()
    finally:
        await book.aclose()
        await stats.aclose()
    out = cheapest_json(
        "--model", WIZARD, "--prompt-tokens", "1000", "--max-tokens", "100",
        REDIS_URL=REDIS_URL, STATS_PREFIX=prefix, **KEYS,
    )  # fmt: skip
    first = out["routes"][0]
    assert (first["route"], first["input_price"], first["output_price"]) == (DEEPINFRA, 0.01, 0.02)
    assert out["best"] == DEEPINFRA
    uptime = {r["route"]: r["uptime"] for r in out["routes"]}
    assert uptime[LEPTON]["5m"] == pytest.approx(0.8) and uptime[DEEPINFRA]["5m"] is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_serve_answers_on_the_given_port() -> None:
    port = _free_port()
    process = subprocess.Popen(
        [*gateway_cmd(), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=clean_env(**KEYS, LOG_LEVEL="warning"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "gateway serve did not start"
                time.sleep(0.2)
        assert response.status_code == 200
        assert WIZARD in {m["id"] for m in response.json()["data"]}
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_unreachable_redis_is_a_warning_not_a_failure(
    in_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2pass@127.0.0.1:1/0")
    status, out, err = in_process("routes")
    assert status == 0 and LEPTON in out
    assert "Redis (REDIS_URL) unreachable" in err and "hunter2pass" not in err + out
