import math

import pytest
import torch

from local_backend.sampling import (
    SamplingParams,
    SamplingState,
    apply_penalties,
    sample,
    top_k_top_p_probs,
)

VOCAB = 50


def states_for(params_list, prompt=(), vocab=VOCAB):
    return [SamplingState(p, list(prompt), vocab) for p in params_list]


def random_logits(batch, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3


def test_greedy_is_argmax_and_top_k_one_is_greedy():
    logits = random_logits(6)
    params = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(temperature=1.3, top_k=1)] * 3
    tokens, _ = sample(logits, states_for(params))
    assert tokens == logits.argmax(dim=-1).tolist()


def test_seed_reproducible_and_independent_of_batch_mates():
    def draw(states, logits_rows, steps=25):
        out: list[list[int]] = [[] for _ in states]
        for step in range(steps):
            logits = torch.stack([row(step) for row in logits_rows])
            tokens, _ = sample(logits, states)
            for seq, tok in zip(out, tokens, strict=True):
                seq.append(tok)
        return out

    def row(seed):
        return lambda step: random_logits(1, seed=seed * 1000 + step)[0] * 0.3  # flat-ish

    params = SamplingParams(temperature=1.0, seed=1234)
    alone = draw(states_for([params]), [row(1)])[0]
    again = draw(states_for([params]), [row(1)])[0]
    mates = [SamplingParams(temperature=0.9, seed=7), params, SamplingParams(temperature=1.5)]
    in_batch = draw(states_for(mates), [row(2), row(1), row(3)])[1]
    assert alone == again == in_batch
    other_seed = draw(states_for([SamplingParams(temperature=1.0, seed=999)]), [row(1)])[0]
    assert other_seed != alone  # 25 draws from a flat distribution: a collision is ~impossible


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = 4000
    logits = probs.log().expand(draws, 4).contiguous()
    states = [SamplingState(SamplingParams(seed=i), [], 4) for i in range(draws)]
    tokens, _ = sample(logits, states)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / draws
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_top_p_mask_keeps_smallest_prefix_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    for top_p, kept in [(0.45, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})]:
        probs, ids = top_k_top_p_probs(
            logits, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([top_p])
        )
        nonzero = {int(ids[0, j]) for j in range(4) if probs[0, j] > 0}
        assert nonzero == kept, (top_p, nonzero)
        assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)


def test_top_p_matches_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = random_logits(4)
    for top_p in (0.3, 0.6, 0.9):
        ours, ids = top_k_top_p_probs(
            logits, torch.ones(4), torch.zeros(4, dtype=torch.long), torch.full((4,), top_p)
        )
        hf = TopPLogitsWarper(top_p)(None, logits.clone())
        hf_kept = torch.isfinite(hf)
        ours_kept = torch.zeros_like(hf_kept).scatter(1, ids, ours > 0)
        assert torch.equal(ours_kept, hf_kept)


def test_top_k_then_sampling_only_uses_k_tokens():
    logits = random_logits(1)
    top3 = set(logits.topk(3).indices[0].tolist())
    state = SamplingState(SamplingParams(temperature=5.0, top_k=3, seed=3), [], VOCAB)
    seen = {sample(logits, [state])[0][0] for _ in range(200)}
    assert seen == top3  # a hot temperature spreads draws over all three, never beyond


def test_presence_and_frequency_penalties_hand_computed():
    state = SamplingState(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1], 4)
    for tok in (0, 0, 2):
        state.record(tok)
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    # token 0: 2 - 2*0.25 - 0.5; token 2: 0.5 - 1*0.25 - 0.5; prompt-only token 1 untouched
    expected = torch.tensor([[1.0, -1.0, -0.25, 1.0]])
    assert torch.allclose(apply_penalties(logits, [state]), expected)


def test_repetition_penalty_hand_computed_and_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    state = SamplingState(SamplingParams(repetition_penalty=2.0), [1], 4)
    for tok in (0, 2):
        state.record(tok)
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    # seen = prompt {1} + output {0, 2}: positive / 2, negative * 2; token 3 unseen
    expected = torch.tensor([[1.0, -2.0, 0.25, 1.0]])
    assert torch.allclose(apply_penalties(logits, [state]), expected)
    hf = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[1, 0, 2]]), logits.clone())
    assert torch.allclose(hf, expected)


def test_penalties_apply_only_to_their_rows_and_change_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    penalised = SamplingState(SamplingParams(temperature=0.0, frequency_penalty=1.0), [], 3)
    plain = SamplingState(SamplingParams(temperature=0.0), [], 3)
    assert sample(logits, [penalised, plain])[0] == [0, 0]
    # token 0 has now been generated once by each: only the penalised row moves to token 1
    assert sample(logits, [penalised, plain])[0] == [1, 0]


def test_logprobs_are_raw_log_softmax_with_sorted_top():
    logits = random_logits(2)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0)]
    tokens, logprobs = sample(logits, states_for(params))
    assert logprobs[1] is None
    lp = logprobs[0]
    assert lp is not None
    reference = torch.log_softmax(logits[0], dim=-1)
    assert lp.token_id == tokens[0]
    assert math.isclose(lp.logprob, float(reference[tokens[0]]), abs_tol=1e-5)
    assert [t for t, _ in lp.top] == reference.topk(3).indices.tolist()
    assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"repetition_penalty": 0.0},
        {"logprobs": 21},
    ],
)
def test_invalid_params_raise_value_error_naming_the_field(kwargs):
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=field.split("_")[0]):
        SamplingParams(**kwargs)


def test_precomputed_greedy_tokens_are_used_unless_penalties_change_the_argmax():
    """The decode graph hands its argmax over; sampling trusts it (a deliberately wrong one
    shows it is read) except where a penalty row makes the raw argmax wrong."""
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    handed = torch.tensor([2, 1])  # not the argmax: proves the tensor is what gets used
    plain = [SamplingState(SamplingParams(temperature=0.0), [], 3) for _ in range(2)]
    assert sample(logits, plain, handed)[0] == [2, 1]
    penalised = SamplingState(SamplingParams(temperature=0.0, frequency_penalty=1.0), [], 3)
    assert sample(logits, [penalised, plain[1]], handed)[0] == [0, 0]  # recomputed
    # a random row among greedy ones still draws; the greedy row keeps the handed token
    states = [plain[0], SamplingState(SamplingParams(temperature=1.0, seed=1), [], 3)]
    tokens, _ = sample(torch.tensor([[0.0, 0.0, 9.0], [0.0, 0.0, 50.0]]), states, handed)
    assert tokens == [2, 2]
    assert handed.tolist() == [2, 1]  # the graph's buffer is not written into
