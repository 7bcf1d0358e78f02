"""The `gateway` command's standards: every bad input is one line on stderr and exit 2, closed
pipes end quietly, tables fit 100 columns with right-aligned numbers, `--help` shows defaults,
and `cheapest`'s traffic shares are what the server's router does."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.output import MAX_WIDTH
from gateway.settings import HOSTED_PROVIDERS
from gateway.stats import make_stats
from gateway.stats.base import Attempt
from tests.gateway.routing_fixtures import (
    DEEPINFRA,
    LEPTON,
    OPENROUTER,
    REDIS_URL,
    WIZARD,
    chat,
    delete_prefix,
    make_router,
    redis_prefix,
)
from tests.gateway.test_cli import REPO, clean_env, gateway_cmd, make_in_process


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """`gateway ARGS` in this process (LEPTON and DEEPINFRA keys set): (status, out, err)."""
    return make_in_process(monkeypatch, capsys)


ALL_KEYS = {f"{name.upper()}_API_KEY": f"k-{name}" for name in HOSTED_PROVIDERS}


def _one_line_error(status: int, out: str, err: str) -> str:
    assert status == 2, (out, err)
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gateway: error: ")
    return lines[0]


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_bad_pricing_files_are_one_line_naming_file_and_problem(
    tmp_path: Path, in_process: Any
) -> None:
    cases = {
        "latin1.yaml": (b"providers:\n  caf\xe9: {}\n", "not UTF-8 text (byte 0xe9 at offset"),
        "empty.yaml": (b"", "the file is empty"),
        "blank.yaml": (b"# only a comment\n", "the file is empty"),
        "list.yaml": (b"- a\n- b\n", "the top level must be a mapping, not a list"),
        "broken.yaml": (b"models: [1,\n", "not valid YAML"),
    }
    for name, (data, problem) in cases.items():
        path = _write(tmp_path, name, data)
        for args in (("routes",), ("cheapest", "-m", WIZARD, "--prompt-tokens", "1"), ("serve",)):
            line = _one_line_error(*in_process(*args, "--config", path))
            assert path in line and problem in line, (args, line)


def test_bad_numbers_and_options_exit_2(in_process: Any) -> None:
    huge = "99999999999999999999"
    expect = {
        ("serve", "--port", "99999"): "'--port'",
        ("serve", "--port", "0"): "'--port'",
        ("serve", "--port", "http"): "'--port'",
        ("serve", "--log-format", "xml"): "'--log-format'",
        ("cheapest", "-m", WIZARD, "--prompt-tokens", huge): "'--prompt-tokens'",
        ("cheapest", "-m", WIZARD, "--prompt-tokens", "1", "--max-tokens", huge): "--max-tokens",
        ("cheapest", "-m", WIZARD, "--prompt-tokens", "-1"): "'--prompt-tokens'",
        ("cheapest", "-m", WIZARD, "--prompt-tokens", "1e3"): "'--prompt-tokens'",
        ("cheapest", "-m", WIZARD): "--prompt-tokens",
        ("routes", "--no-such-option"): "--no-such-option",
        ("frobnicate",): "frobnicate",
    }
    for args, named in expect.items():
        line = _one_line_error(*in_process(*args))
        assert named in line, (args, line)


def test_bad_settings_from_the_environment_exit_2(
    in_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PORT", "99999")
    line = _one_line_error(*in_process("serve"))
    assert "PORT" in line and "65535" in line
    monkeypatch.delenv("PORT")
    monkeypatch.setenv("CLIENT_LIMITS", "{not json")
    assert "CLIENT_LIMITS" in _one_line_error(*in_process("routes"))


def test_no_command_prints_help_and_exits_2(in_process: Any) -> None:
    status, out, _ = in_process()
    assert status == 2 and "serve" in out and "cheapest" in out


def test_help_shows_every_option_with_its_default_and_an_example(in_process: Any) -> None:
    status, out, _ = in_process("cheapest", "--help")
    assert status == 0
    for text in ("--model", "--prompt-tokens", "--max-tokens", "--config", "--json"):
        assert text in out
    assert out.count("[default:") >= 2 and "GATEWAY_CONFIG" in out  # both optional values
    assert "Example" in out and "Exit status" in out
    status, out, _ = in_process("serve", "--help")
    assert status == 0 and "127.0.0.1" in out and "8000" in out and "1<=x<=65535" in out


def _closed_pipe_run(*args: str) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before we write: every write is EPIPE
    try:
        return subprocess.run(
            [*gateway_cmd(), *args],
            env=clean_env(**ALL_KEYS),
            cwd=REPO,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args", [("routes",), ("cheapest", "--json", "-m", WIZARD, "--prompt-tokens", "10")]
)
def test_a_closed_pipe_ends_quietly(args: tuple[str, ...]) -> None:
    done = _closed_pipe_run(*args)
    assert done.returncode == 0 and done.stderr == ""


PRICES = re.compile(r"\d+\.\d+/\d+\.\d+")


def _table_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if PRICES.search(line)]


def test_tables_fit_100_columns_with_numbers_right_aligned(
    in_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ALL_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal still gets at most 100 columns
    for args in (
        ("routes",),
        ("cheapest", "-m", WIZARD, "--prompt-tokens", "65000", "--max-tokens", "1000"),
    ):
        status, out, _ = in_process(*args)
        assert status == 0
        assert max(len(line) for line in out.splitlines()) <= MAX_WIDTH, out
        rows = _table_rows(out)
        assert len(rows) >= 5
        # the price column ("0.50/0.50") ends at the same column on every row of a table
        ends = {match.end() for line in rows[:5] if (match := PRICES.search(line))}
        assert len(ends) == 1, out
    monkeypatch.setenv("COLUMNS", "60")  # a narrow terminal: the table wraps to fit it
    status, out, _ = in_process("routes")
    assert status == 0 and max(len(line) for line in out.splitlines()) <= 60


def test_cheapest_traffic_share_is_the_servers_split(in_process: Any) -> None:
    # in_process has LEPTON and DEEPINFRA keys; the JSON shares come from Router.traffic_shares
    status, out, err = in_process("cheapest", "--json", "-m", WIZARD, "--prompt-tokens", "2000")
    assert status == 0, err
    shares = {r["route"]: r["traffic_share"] for r in json.loads(out)["routes"]}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares[OPENROUTER] == 0.0  # no key: no traffic
    # exactly the server's split for the CLI's own routes and token mix (max_tokens unset)
    server = make_router(available={"lepton", "deepinfra"}).traffic_shares(WIZARD, 2000, None)
    assert {r: s for r, s in shares.items() if s} == pytest.approx(server)
    assert shares[LEPTON] > shares[DEEPINFRA] > 0  # cheaper gets more, both get some
    # the server's own planner, sampled: how often each route is tried first
    router = make_router(available={"lepton", "openrouter"}, seed=7)
    expected = router.traffic_shares(WIZARD, 2000, 500)
    n = 6000
    firsts = collections.Counter(
        router.plan(chat("x" * 10, max_tokens=500)).candidates[0].id for _ in range(n)
    )
    assert set(firsts) == set(expected) == {LEPTON, OPENROUTER}
    for route, share in expected.items():
        sigma = (share * (1 - share) / n) ** 0.5
        assert abs(firsts[route] / n - share) < 4 * sigma, (route, firsts, expected)
    # 1/cost² at equal token mixes: 0.48 vs 0.50 per 1M
    assert expected[OPENROUTER] == pytest.approx((1 / 0.48**2) / (1 / 0.48**2 + 1 / 0.5**2))


@pytest.fixture
def prefix() -> Iterator[str]:
    value = redis_prefix()
    yield value
    asyncio.run(delete_prefix(value))


def test_a_failing_route_is_never_shown_live_and_gets_no_first_share(prefix: str) -> None:
    async def record() -> None:
        stats = make_stats(REDIS_URL, prefix=prefix)
        try:
            for _ in range(3):  # what a replica saw: every openrouter call failed
                stats.record_attempt(
                    Attempt(OPENROUTER, ok=False, latency_s=0.1, error_kind="http_500")
                )
            await stats.flush()
        finally:
            await stats.aclose()

    asyncio.run(record())
    env = {**ALL_KEYS, "REDIS_URL": REDIS_URL, "STATS_PREFIX": prefix}
    done = subprocess.run(
        [*gateway_cmd(), "cheapest", "--json", "-m", WIZARD, "--prompt-tokens", "100"],
        env=clean_env(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = {r["route"]: r for r in json.loads(done.stdout)["routes"]}
    assert rows[OPENROUTER]["status"].startswith(("failing", "circuit open")), rows[OPENROUTER]
    assert rows[OPENROUTER]["traffic_share"] == 0.0  # tried only after the healthy ones
    assert rows[LEPTON]["status"] == "live" and rows[LEPTON]["traffic_share"] > 0
    assert rows[OPENROUTER]["uptime"]["5m"] == 0.0
    table = subprocess.run(
        [*gateway_cmd(), "routes"],
        env=clean_env(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    row = next(line for line in table.splitlines() if line.split()[:1] == [OPENROUTER])
    assert "live" not in row and "0.0%" in row


def test_a_taken_port_is_a_runtime_failure_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*gateway_cmd(), "serve", "--port", str(port)],
            env=clean_env(LOG_LEVEL="warning"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("gateway: error:")]
    assert errors == [f"gateway: error: the server could not start on 127.0.0.1:{port} (see above)"]


def test_an_ascii_only_terminal_gets_text_not_a_traceback() -> None:
    for args in (("routes",), ("cheapest", "-m", WIZARD, "--prompt-tokens", "10")):
        done = subprocess.run(
            [*gateway_cmd(), *args],
            env=clean_env(**ALL_KEYS, PYTHONIOENCODING="ascii"),
            cwd=REPO,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0 and done.stderr == b"", done.stderr
        done.stdout.decode("ascii")  # nothing but ASCII reached the terminal
