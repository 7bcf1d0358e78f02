"""The gateway's CPU per request as instructions (callgrind), the figure other load cannot move.

    python bench/cpu_instructions.py --baseline /path/to/other/checkout     # writes the section
    python bench/cpu_instructions.py --no-write --requests 100

On a shared machine CPU time per request moves with whatever else runs (caches, frequency,
SMT siblings); the number of instructions the gateway executes per request does not. Each
gateway (this checkout and, with --baseline, another one) runs as `gateway serve` under
`valgrind --tool=callgrind` with instrumentation off; after a warm-up the bench switches it on
(`callgrind_control -i on`), sends --requests sequential requests with the raw-socket client,
waits for the after-response stats writes, switches it off and dumps: total instructions (Ir)
/ requests. The fake upstream runs natively in its own process (not counted). Cases: a
non-stream chat completion, and a stream of 50 chunks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from doc_section import write_section  # noqa: E402  (bench/ is the script's path)
from loadgen import RawClient, encode_post  # noqa: E402
from overhead import (  # noqa: E402
    DIRECT_PATH,
    GW_PATH,
    MODEL,
    SLUG,
    Server,
    body,
    cpu_name,
    free_port,
    gateway_env,
    wait_answering,
)

START, END = "<!-- overhead_instructions:start -->", "<!-- overhead_instructions:end -->"


def start_under_callgrind(checkout: Path, upstream_port: int, out_dir: Path) -> Server:
    env = gateway_env(checkout, upstream_port)
    port = free_port()
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_dir}/callgrind.%p.out",
        sys.executable,
        *("-m", "gateway.cli", "serve", "--port", str(port)),
    ]
    server = Server(checkout.name, command, env, checkout, port)
    wait_answering(port, GW_PATH, body(MODEL, False), timeout_s=600)
    return server


def instructions_per_request(server: Server, stream: bool, n: int, out_dir: Path) -> float:
    pid = str(server.process.pid)
    client = RawClient(server.port)
    request = encode_post("127.0.0.1", GW_PATH, body(MODEL, stream))
    for _ in range(30):  # warm-up, not counted: pools, caches, the tokenizer's first load
        client.send(request)
    before = set(out_dir.glob(f"callgrind.{pid}.out.*"))
    subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
    for _ in range(n):
        client.send(request)
    time.sleep(1.0)  # the stats writes queued behind the last response
    subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    client.close()
    deadline = time.monotonic() + 60
    while not (dumps := set(out_dir.glob(f"callgrind.{pid}.out.*")) - before):
        if time.monotonic() > deadline:
            raise RuntimeError("callgrind wrote no dump")
        time.sleep(0.2)
    text = max(dumps, key=lambda p: p.stat().st_mtime).read_text(errors="replace")
    found = re.search(r"^totals:\s*(\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError("no totals in the callgrind dump")
    return int(found.group(1)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="counted, per case")
    parser.add_argument("--baseline", type=Path, help="another checkout, measured the same way")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    checkouts = [("this checkout", ROOT)]
    if args.baseline is not None:
        checkouts.append(("baseline", args.baseline.resolve()))
    upstream_port = free_port()
    role = ["--role", "upstream", "--port", str(upstream_port)]
    upstream = Server(
        "upstream",
        [sys.executable, str(Path(__file__).with_name("overhead.py")), *role],
        {**os.environ, "PYTHONPATH": str(ROOT)},
        ROOT,
        upstream_port,
    )
    results: dict[str, dict[str, float]] = {}
    n = args.requests
    try:
        wait_answering(upstream_port, DIRECT_PATH, body(SLUG, False))
        for name, checkout in checkouts:
            with tempfile.TemporaryDirectory() as tmp:
                server = start_under_callgrind(checkout, upstream_port, Path(tmp))
                try:
                    results[name] = {
                        kind: instructions_per_request(server, kind == "stream", n, Path(tmp))
                        for kind in ("non-stream", "stream")
                    }
                finally:
                    server.stop()
            print(name, json.dumps(results[name]), flush=True)
    finally:
        upstream.stop()
    text = render(results, args.requests)
    print(text)
    if not args.no_write:
        write_section(text, START, END)
        print("wrote docs/benchmarks.md")


def render(results: dict[str, dict[str, float]], n: int) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    names = list(results)
    rows = ["| case | " + " | ".join(names) + (" | ratio |" if len(names) > 1 else " |")]
    rows.append("|---" * (len(names) + 1 + (len(names) > 1)) + "|")
    for kind in ("non-stream", "stream"):
        cells = [f"{results[name][kind] / 1000:,.0f} K" for name in names]
        ratio = (
            [f"**{results[names[0]][kind] / results[names[1]][kind]:.2f}**"]
            if len(names) > 1
            else []
        )
        rows.append(f"| {kind} | " + " | ".join(cells + ratio) + " |")
    return "\n".join(
        [
            START,
            "## Gateway CPU per request, in instructions (`bench/cpu_instructions.py`)",
            "",
            f"Measured {when} on {os.cpu_count()} × {cpu_name()}, Python "
            f"{platform.python_version()}: `gateway serve` under callgrind, {n} sequential "
            "requests counted per case after a warm-up (raw-socket client, fake upstream "
            "outside the count; stream = 50 chunks). Instructions executed by the gateway "
            "process per request, everything included (HTTP server, routing, the upstream "
            "call, the response, the stats writes after it): unlike CPU time, unmoved by the "
            "machine's other load. Ratio = this checkout / baseline.",
            "",
            *rows,
            END,
        ]
    )


if __name__ == "__main__":
    main()
