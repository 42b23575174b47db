"""Token selection: log-prob semantics, truncation, penalties, seeded reproducibility."""

from __future__ import annotations

import torch

from nexrl_async.inference.local.sampling import RowSampler, SamplingSpec, draw

VOCAB = 12


def _row(**spec: object) -> RowSampler:
    params = {"max_new_tokens": 8, **spec}
    return RowSampler.create(
        SamplingSpec(**params),  # type: ignore[arg-type]
        eos_ids=frozenset({2}),
        prompt=[1, 5],
        vocab=VOCAB,
    )


def test_logprobs_are_temperature_scaled_full_vocab_and_raw_for_greedy() -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    rows = [_row(temperature=0.5), _row(temperature=0.0)]
    drawn = draw(logits, rows, [0, 0])
    assert torch.allclose(drawn.logprobs[0], torch.log_softmax(logits[0] / 0.5, -1))
    assert torch.allclose(drawn.logprobs[1], torch.log_softmax(logits[1], -1))
    assert int(drawn.tokens[1]) == int(logits[1].argmax())
    picked = drawn.logprobs.gather(-1, drawn.tokens[:, None])[:, 0]
    assert torch.allclose(drawn.token_logprobs, picked)


def test_truncation_keeps_samples_inside_the_support() -> None:
    logits = torch.linspace(0, 3, VOCAB).repeat(3, 1)
    top = set(logits[0].topk(3).indices.tolist())
    rows = [_row(top_k=3), _row(top_p=0.3), _row(min_p=0.9)]
    probs = torch.softmax(logits[0], -1)
    sorted_p = probs.sort(descending=True).values
    in_top_p = set(
        probs.argsort(descending=True)[: int((sorted_p.cumsum(0) - sorted_p <= 0.3).sum())].tolist()
    )
    in_min_p = set((probs >= 0.9 * probs.max()).nonzero()[:, 0].tolist())
    for _ in range(50):
        tokens = draw(logits, rows, [0, 0, 0]).tokens.tolist()
        assert tokens[0] in top
        assert tokens[1] in in_top_p
        assert tokens[2] in in_min_p


def test_seeded_rows_ignore_their_batch_neighbours() -> None:
    logits = torch.zeros(1, VOCAB)
    alone = [
        int(draw(logits, [row], [0]).tokens[0]) for row in [_row(sampling_seed=5)] for _ in range(1)
    ]
    seeded = _row(sampling_seed=5)
    first = [int(draw(logits, [seeded], [i]).tokens[0]) for i in range(6)]
    seeded_again = _row(sampling_seed=5)
    mixed = [
        int(draw(logits.repeat(3, 1), [_row(), seeded_again, _row()], [i] * 3).tokens[1])
        for i in range(6)
    ]
    assert first == mixed
    assert first[0] == alone[0]
    assert len(set(first)) > 1  # it does sample


def test_penalties_bias_and_min_new_tokens() -> None:
    logits = torch.zeros(1, VOCAB)
    biased = draw(logits, [_row(logit_bias={7: 50.0})], [0])
    assert int(biased.tokens[0]) == 7
    eos_first = torch.zeros(1, VOCAB)
    eos_first[0, 2] = 10.0
    held = draw(eos_first, [_row(temperature=0.0, min_new_tokens=2)], [0])
    assert int(held.tokens[0]) != 2
    free = draw(eos_first, [_row(temperature=0.0, min_new_tokens=2)], [2])
    assert int(free.tokens[0]) == 2
    row = _row(temperature=0.0, presence_penalty=2.0)
    favoured = torch.zeros(1, VOCAB)
    favoured[0, 4] = 1.0
    assert int(draw(favoured, [row], [0]).tokens[0]) == 4
    row.observe(4)
    assert int(draw(favoured, [row], [1]).tokens[0]) != 4
