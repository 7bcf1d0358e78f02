"""A saved Hugging Face checkpoint, served by `python -m local_backend serve` on CPU, answers
greedy completions equal to transformers' (the issue's "done when" for a `.[local]` install).

The server side needs no transformers: it compares with data/tiny_greedy.json, greedy token
ids that transformers computed from the same checkpoint (tiny_checkpoint.py, seed 0). The
main venv's test re-derives those ids with transformers on every run, so the committed file
cannot drift from transformers. Regenerate it (after changing the checkpoint) with
`python -m tests.local_server.test_hf_greedy`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from local_backend.openai_tokens import token_text
from local_backend.tokenizer import Tokenizer

from .cli import free_port, serve_cli, wait_ready

REFERENCE = Path(__file__).parent / "data" / "tiny_greedy.json"
MODEL = "wizardlm-2-8x22b"  # the checkpoint's folder name: the v1 tokenizer and vicuna format
PROMPTS = ([1, 9022, 3714, 264, 727], [1, 415, 5565, 302, 4843, 349, 5465, 28723, 330])
MAX_TOKENS = 16


def transformers_greedy(folder: Path, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy ids by transformers' MixtralForCausalLM, one full forward per token (no cache,
    no generate() defaults in the way), float32."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_served_checkpoint_answers_transformers_greedy_tokens(tiny_checkpoint: Path) -> None:
    reference = json.loads(REFERENCE.read_text())
    tokenizer = Tokenizer.from_mistral_common("v1")
    port = free_port()
    process = serve_cli(tiny_checkpoint, port)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process)
        for case in reference["cases"]:
            body: dict[str, Any] = {
                "model": MODEL,
                "prompt": case["prompt_ids"],
                "max_tokens": case["max_tokens"],
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": 0,
            }
            answer = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
            choice = answer["choices"][0]
            want = [token_text(tokenizer, t)[0] for t in case["greedy_ids"]]
            assert choice["logprobs"]["tokens"] == want
            assert choice["text"] == "".join(want)
            assert answer["usage"]["completion_tokens"] == len(case["greedy_ids"])
    finally:
        process.terminate()
        process.wait(20)


def test_committed_reference_is_what_transformers_answers(tiny_checkpoint: Path) -> None:
    pytest.importorskip("transformers")
    reference = json.loads(REFERENCE.read_text())
    assert [c["prompt_ids"] for c in reference["cases"]] == [list(p) for p in PROMPTS]
    for case in reference["cases"]:
        got = transformers_greedy(tiny_checkpoint, case["prompt_ids"], case["max_tokens"])
        assert got == case["greedy_ids"]


if __name__ == "__main__":  # regenerate data/tiny_greedy.json
    import tempfile

    from .tiny_checkpoint import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_checkpoint(Path(tmp) / MODEL)
        cases = [
            {
                "prompt_ids": list(p),
                "max_tokens": MAX_TOKENS,
                "greedy_ids": transformers_greedy(folder, list(p), MAX_TOKENS),
            }
            for p in PROMPTS
        ]
    lines = ",\n  ".join(json.dumps(case) for case in cases)
    REFERENCE.write_text(f'{{"checkpoint_seed": 0, "cases": [\n  {lines}\n]}}\n')
    print(f"wrote {REFERENCE}")
