import asyncio
import gc

import pytest
import torch

from local_backend.generation import (
    ContextLengthExceeded,
    EngineFailure,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    StopStringMatcher,
)
from local_backend.sampling import SamplingParams

from .engine_fixtures import (  # noqa: F401  (fixtures)
    PROMPTS,
    engine_fixture,
    greedy,
    make_engine_fixture,
    tokenizer_fixture,
)


async def wait_until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_batched_greedy_equals_single_greedy_with_ragged_prompts(make_engine):
    # a small prefill chunk makes the 31-token prompt prefill over several steps
    engine = make_engine(prefill_chunk=8, prefill_token_budget=16)
    single = [(await engine.generate(greedy(p))).choices[0].token_ids for p in PROMPTS]
    together = await asyncio.gather(*(engine.generate(greedy(p)) for p in PROMPTS))
    assert [r.choices[0].token_ids for r in together] == single
    assert all(len(tokens) == 12 for tokens in single)
    assert len({tuple(t) for t in single}) == 3  # distinct prompts, distinct continuations


async def test_engine_greedy_matches_transformers_generate(engine, tiny_hf_model_dir):
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(tiny_hf_model_dir, dtype=torch.float32).eval()
    prompt = PROMPTS[1]
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None
        )
    ours = (await engine.generate(greedy(prompt, max_tokens=10))).choices[0].token_ids
    assert ours == out[0, len(prompt) :].tolist()


async def test_sequence_joining_mid_flight_keeps_both_outputs(engine):
    long_prompt, late_prompt = PROMPTS[0], PROMPTS[2]
    solo_long = (await engine.generate(greedy(long_prompt, 40))).choices[0].token_ids
    solo_late = (await engine.generate(greedy(late_prompt, 10))).choices[0].token_ids

    first = engine.submit(greedy(long_prompt, 40))
    first_tokens = []
    async for delta in first:
        first_tokens += delta.token_ids
        if len(first_tokens) == 5:
            break
    assert not first.finished
    late = await engine.generate(greedy(late_prompt, 10))  # joins while `first` is running
    assert not first.finished and len(first_tokens) < 40
    async for delta in first:
        first_tokens += delta.token_ids
    assert first_tokens == solo_long
    assert late.choices[0].token_ids == solo_late


async def test_stop_string_across_delta_boundary_is_cut_and_not_returned(engine):
    stream = engine.submit(greedy(PROMPTS[1], 40))
    deltas = [d.text async for d in stream]
    full = "".join(deltas)
    # a stop string made of the end of one delta and the start of the next
    k = next(i for i in range(1, len(deltas) - 1) if len(deltas[i]) >= 2 and deltas[i + 1])
    stop = deltas[k][-2:] + deltas[k + 1][:1]
    expected = full[: full.index(stop)]
    result = await engine.generate(greedy(PROMPTS[1], 40, stop=[stop, "never-seen-xyz"]))
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == expected
    assert stop not in choice.text
    assert result.usage.completion_tokens == len(choice.token_ids) < 40


def test_stop_matcher_holds_back_only_possible_prefixes():
    matcher = StopStringMatcher(["END", "xy"])
    assert matcher.push("abcE") == ("abc", False)  # "E" may start "END"
    assert matcher.push("Nd") == ("ENd", False)  # "ENd" is no prefix of anything
    assert matcher.push("ok x") == ("ok ", False)
    assert matcher.push("yz") == ("", True)  # "xy" completed across deltas
    assert StopStringMatcher([]).push("abc") == ("abc", False)


async def test_max_tokens_finishes_with_length_and_counts_usage(engine):
    result = await engine.generate(greedy(PROMPTS[0], 7))
    assert result.choices[0].finish_reason == "length"
    assert len(result.choices[0].token_ids) == 7
    assert result.usage.prompt_tokens == len(PROMPTS[0])
    assert result.usage.completion_tokens == 7
    assert result.usage.total_tokens == len(PROMPTS[0]) + 7


async def test_stop_token_id_finishes_with_stop_and_drops_its_text(engine, tokenizer):
    reference = (await engine.generate(greedy(PROMPTS[1], 12))).choices[0]
    stop_at = next(i for i in range(3, 12) if reference.token_ids[i] not in reference.token_ids[:i])
    stop_id = reference.token_ids[stop_at]
    result = await engine.generate(greedy(PROMPTS[1], 12, stop_token_ids=[stop_id]))
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.token_ids == reference.token_ids[: stop_at + 1]
    assert result.usage.completion_tokens == stop_at + 1
    assert choice.text == tokenizer.decode(reference.token_ids[:stop_at])


async def test_n_two_shares_prompt_usage_and_seeded_choice_zero_matches_n_one(engine):
    params = SamplingParams(temperature=1.0, seed=42)
    one = await engine.generate(GenerationRequest(PROMPTS[0], 10, params, ignore_eos=True))
    two = await engine.generate(GenerationRequest(PROMPTS[0], 10, params, ignore_eos=True, n=2))
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].token_ids == one.choices[0].token_ids
    assert two.choices[1].token_ids != two.choices[0].token_ids
    assert two.usage.prompt_tokens == len(PROMPTS[0])
    assert two.usage.completion_tokens == 20


async def test_cancellation_frees_the_slot(make_engine):
    engine = make_engine(max_slots=1)
    stream = engine.submit(greedy(PROMPTS[0], 200))
    await stream.__anext__()
    assert engine.capacity().active_slots == 1
    stream.cancel()
    await wait_until(lambda: engine.capacity().active_slots == 0)
    stats = engine.stats()
    assert stats.requests_cancelled == 1 and stats.requests_finished == 0
    assert stats.completion_tokens < 200  # stopped early, not run to max_tokens
    # the only slot serves the next request
    result = await engine.generate(greedy(PROMPTS[1], 3))
    assert result.choices[0].finish_reason == "length"


async def test_dropped_stream_is_cancelled(make_engine):
    engine = make_engine(max_slots=1)
    stream = engine.submit(greedy(PROMPTS[0], 200))
    await stream.__anext__()
    del stream
    gc.collect()
    await wait_until(lambda: engine.capacity().active_slots == 0)
    assert engine.stats().requests_cancelled == 1


async def test_queue_full_raises_and_capacity_reports_it(make_engine):
    engine = make_engine(start=False, max_slots=1, queue_size=2)
    streams = [engine.submit(greedy(PROMPTS[0], 2)) for _ in range(2)]
    capacity = engine.capacity()
    assert capacity.queue_depth == 2 and not capacity.accepting
    with pytest.raises(QueueFull) as err:
        engine.submit(greedy(PROMPTS[0], 2))
    assert err.value.status == 429
    engine.start()
    for stream in streams:
        assert len([d async for d in stream]) == 2
    assert engine.capacity().accepting


async def test_context_and_input_checks(engine):
    with pytest.raises(ContextLengthExceeded) as err:
        engine.submit(greedy(PROMPTS[0], engine.max_seq_len))
    assert err.value.status == 400 and "maximum context length" in err.value.message
    bad = [
        greedy([]),
        greedy([1, 32000]),
        greedy(PROMPTS[0], n=engine.max_slots + 1),
        greedy(PROMPTS[0], 0),
    ]
    for request in bad:
        with pytest.raises(InvalidRequest):
            engine.submit(request)
    assert engine.capacity().queue_depth == 0


async def test_a_failing_step_fails_its_requests_and_the_engine_recovers(make_engine):
    engine = make_engine()
    real_step = engine._scheduler.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device error")
        return real_step()

    engine._scheduler.step = flaky_step  # type: ignore[method-assign]
    with pytest.raises(EngineFailure) as err:
        await engine.generate(greedy(PROMPTS[0], 5))
    assert "simulated" not in err.value.message  # internals stay in the log
    assert engine.capacity().active_slots == 0
    assert (await engine.generate(greedy(PROMPTS[0], 3))).choices[0].finish_reason == "length"
