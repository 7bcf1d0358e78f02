"""Tensor- and expert-parallel inference: each rank's shard, and gloo worlds of 2 and 4 ranks
giving the single-process model's greedy tokens and logits (fp32, CPU)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from local_backend.kv_cache import KVCache
from local_backend.model import Transformer
from local_backend.parallel import SINGLE_PROCESS, ParallelContext
from local_backend.parallel_serve import load_rank_model
from local_backend.weights import WeightsError

from .parallel_helpers import (
    MAX_SEQ_LEN,
    PROMPTS,
    greedy_trace,
    random_model,
    rank_main,
    save_checkpoint,
    small_config,
)

WORLD = 4  # one spawn of 4 ranks runs the world of 2 (ranks 0-1) and then the world of 4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transformer, Path]:
    """A random model and its checkpoint in two safetensors shards (with an index)."""
    folder = tmp_path_factory.mktemp("parallel_ckpt")
    return save_checkpoint(random_model(small_config(), seed=3), folder, shards=2), folder


def single_process_trace(folder: Path) -> dict:
    model = Transformer.from_model_dir(folder, dtype=torch.float32, progress=False)
    cache = KVCache(model.config, len(PROMPTS), MAX_SEQ_LEN, dtype=torch.float32)
    return greedy_trace(model, cache, PROMPTS, steps=4)


@pytest.fixture(scope="module")
def rank_traces(
    reference: tuple[Transformer, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[int, dict]:
    """Spawn 4 gloo ranks once: rank 0's traces for the worlds of 2 and 4, and what ranks 0
    and 1 saw of two failed loads."""
    _, folder = reference
    out = tmp_path_factory.mktemp("parallel_out")
    broken = tmp_path_factory.mktemp("parallel_broken")
    save_checkpoint(random_model(small_config(), seed=3), broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w2.weight"]  # rank 1 of 2's expert
    save_file(tensors, str(broken / "model.safetensors"))
    init = f"file://{out}/rendezvous"
    context = mp.start_processes(
        rank_main, args=(WORLD, str(folder), str(broken), str(out), init), nprocs=WORLD,
        join=False, start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the gloo ranks did not finish within 120 s")
    traces: dict[Any, dict] = {w: torch.load(out / f"world{w}.pt") for w in (2, 4)}
    traces["failures"] = {r: torch.load(out / f"failures{r}.pt") for r in (0, 1)}
    traces["int8-experts"] = torch.load(out / "world2-int8-experts.pt")
    return traces


def test_two_ranks_with_int8_experts_equal_one_process(
    reference: tuple[Transformer, Path], rank_traces: dict[Any, dict]
) -> None:
    # each expert is quantized whole on its rank, as in one process: the same codes
    from local_backend.quantize import load_quantized

    _, folder = reference
    model, _ = load_quantized(
        folder, "cpu", fmt="int8-experts", backend="torch", dtype=torch.float32,
        max_seq_len=MAX_SEQ_LEN, progress=False,
    )  # fmt: skip
    cache = KVCache(model.config, len(PROMPTS), MAX_SEQ_LEN, dtype=torch.float32)
    expected = greedy_trace(model, cache, PROMPTS, steps=4)
    got = rank_traces["int8-experts"]
    assert torch.equal(got["tokens"], expected["tokens"])
    for ours, theirs in zip(got["logits"], expected["logits"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-5)
    # and quantizing changed the answer's logits: the comparison is about the int8 path
    full_precision = single_process_trace(folder)["logits"][0]
    assert not torch.allclose(expected["logits"][0], full_precision, rtol=1e-5, atol=2e-5)


def test_a_failed_load_on_any_rank_fails_every_rank(rank_traces: dict[Any, dict]) -> None:
    leader, follower = rank_traces["failures"][0], rank_traces["failures"][1]
    # rank 1 lacks an expert only it holds: it exits 1, rank 0 names it and stops its engine
    assert follower["broken"] == 1
    assert leader["broken"] == {
        "error": "RuntimeError: rank(s) [1] of 2 failed to load (see log)",
        "engine_stopped": True,
    }
    # rank 0 fails: its own error stands, and the follower stops instead of waiting forever
    assert leader["leader_fails"]["error"] == "OSError: rank 0 cannot read its disk"
    assert follower["leader_fails"] == 1


@pytest.mark.parametrize("world_size", [2, 4])
def test_gloo_ranks_give_the_single_process_tokens_and_logits(
    reference: tuple[Transformer, Path], rank_traces: dict[int, dict], world_size: int
) -> None:
    _, folder = reference
    expected = single_process_trace(folder)
    traces = rank_traces[world_size]
    for got in (traces["first"], traces["again"]):  # keep-alives went out between the two
        assert torch.equal(got["tokens"], expected["tokens"])
        assert len(got["logits"]) == len(expected["logits"]) == 5
        for ours, theirs in zip(got["logits"], expected["logits"], strict=True):
            # fp32 sums in another order (per-rank partial sums, then all_reduce): the
            # differences are float rounding, ~1e-6 of logits of size ~10
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-5)
    # the prompts decode to more than one distinct token: the comparison is not vacuous
    assert len(set(expected["tokens"].flatten().tolist())) > 2


def _ranks(world_size: int) -> list[ParallelContext]:
    return [ParallelContext(rank, world_size) for rank in range(world_size)]


@pytest.mark.parametrize("layout", ["classic", "fused"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_loads_only_its_slice(tmp_path: Path, layout: str, world_size: int) -> None:
    config = small_config()
    full = save_checkpoint(random_model(config, seed=1), tmp_path, layout=layout)
    H = config.n_heads // world_size * config.head_dim  # query rows per rank
    K = config.n_kv_heads // world_size * config.head_dim
    E = config.n_experts // world_size
    for parallel in _ranks(world_size):
        shard = load_rank_model(tmp_path, parallel, CPU, torch.float32, MAX_SEQ_LEN, 2)
        r = parallel.rank
        for ours, whole in zip(shard.layers, full.layers, strict=True):
            a, b = ours.attention, whole.attention
            assert (a.n_heads, a.n_kv_heads) == (config.n_heads // world_size,
                                                 config.n_kv_heads // world_size)  # fmt: skip
            assert torch.equal(a.wq.weight, b.wq.weight[r * H : (r + 1) * H])
            assert torch.equal(a.wk.weight, b.wk.weight[r * K : (r + 1) * K])
            assert torch.equal(a.wv.weight, b.wv.weight[r * K : (r + 1) * K])
            assert torch.equal(a.wo.weight, b.wo.weight[:, r * H : (r + 1) * H])
            m, n = ours.block_sparse_moe, whole.block_sparse_moe
            assert (m.n_experts, m.first_expert) == (E, r * E)
            for w in ("w1", "w2", "w3"):
                assert torch.equal(getattr(m, w), getattr(n, w)[r * E : (r + 1) * E])
            assert torch.equal(m.gate.weight, n.gate.weight)  # the router is whole
        assert torch.equal(shard.output.weight, full.output.weight)
        assert torch.equal(shard.tok_embeddings.weight, full.tok_embeddings.weight)
        assert shard.cache_kv_heads == config.n_kv_heads // world_size


def test_route_renumbers_experts_to_the_rank(tmp_path: Path) -> None:
    config = small_config()
    full = save_checkpoint(random_model(config, seed=2), tmp_path)
    x = torch.randn(16, config.dim)
    weights, experts = full.layers[0].block_sparse_moe.route(x)
    for parallel in _ranks(4):
        moe = load_rank_model(tmp_path, parallel, CPU, torch.float32, 8, 1).layers[0]
        w, ids = moe.block_sparse_moe.route(x)
        assert torch.equal(w, weights)  # the same global mixing weights on every rank
        assert torch.equal(ids, experts - 2 * parallel.rank)  # 2 experts per rank


def test_one_rank_shard_without_its_experts_is_a_weights_error(tmp_path: Path) -> None:
    config = small_config()
    model = random_model(config, seed=4)
    save_checkpoint(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w2.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    # rank 0 of 2 holds experts 0-3 and never reads 5: it loads; rank 1 names what is missing
    load_rank_model(tmp_path, ParallelContext(0, 2), CPU, torch.float32, 8, 1)
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.5\.w2"):
        load_rank_model(tmp_path, ParallelContext(1, 2), CPU, torch.float32, 8, 1)


def test_ranks_that_do_not_divide_the_heads_are_refused() -> None:
    config = small_config()
    with pytest.raises(ValueError, match=r"over 3 ranks: 8 query heads, 4 key/value heads"):
        Transformer.from_config(config, device="meta", parallel=ParallelContext(0, 3))
    with pytest.raises(ValueError, match="outside"):
        ParallelContext(rank=2, world_size=2)


def test_one_process_is_unchanged() -> None:
    # world size 1 splits nothing and registers no hooks: the single-process model as before
    model = Transformer.from_config(small_config(), device="meta")
    assert model.parallel is SINGLE_PROCESS
    assert SINGLE_PROCESS.tensor_split("layers.0.attention.wq.weight", (64, 64)) is None
    for layer in model.layers:
        assert not layer.attention._forward_hooks and not layer.block_sparse_moe._forward_hooks
        assert layer.block_sparse_moe.first_expert == 0
