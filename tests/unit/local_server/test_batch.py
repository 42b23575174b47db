"""The left-padded KV batch gives the same logits as running each sequence alone."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from nexrl_async.inference.local.batch import DecodeBatch


def _alone(model: PreTrainedModel, seq: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)


def test_prefill_decode_extend_select_match_unbatched_forward(model: PreTrainedModel) -> None:
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 9, 9, 9, 9, 9, 9]]
    seqs = [list(p) for p in prompts[:2]]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        first = DecodeBatch.prefill(model, prompts[:2], all_logits=False)
        batch = first.batch
        logits = first.last_logits
        for step in range(7):
            lps = torch.log_softmax(logits.float(), -1)
            for i, seq in enumerate(seqs):
                assert torch.allclose(lps[i], _alone(model, seq), atol=1e-5), (step, i)
            tokens = torch.randint(4, 16, (batch.size,), generator=gen)
            batch.last = tokens
            for i, seq in enumerate(seqs):
                seq.append(int(tokens[i]))
            logits = batch.decode(model)
            if step == 2:  # a longer prompt joins mid-way
                joined = DecodeBatch.prefill(model, [prompts[2]], all_logits=True)
                full = torch.log_softmax(joined.all_logits[0].float(), -1)  # type: ignore[index]
                assert torch.allclose(full[-1], _alone(model, prompts[2]), atol=1e-5)
                batch.extend(joined.batch)
                seqs.append(list(prompts[2]))
                logits = torch.cat([logits, joined.last_logits])
            if step == 4:  # the first row leaves; padding columns are trimmed
                width = batch.width
                batch.select([1, 2])
                seqs = seqs[1:]
                logits = logits[1:]
                assert batch.width <= width
    assert batch.size == 2
    assert batch.width == max(len(s) for s in seqs)  # leading all-padding columns trimmed
    assert not any(torch.isnan(k).any() for k, _ in batch.layers)


def test_select_nothing_empties_the_batch(model: PreTrainedModel) -> None:
    with torch.inference_mode():
        batch = DecodeBatch.prefill(model, [[1, 5]], all_logits=False).batch
    batch.select([])
    assert (batch.size, batch.width, batch.layers) == (0, 0, [])


def test_identical_prompts_are_prefilled_once(model: PreTrainedModel) -> None:
    """A group (``n`` samples, or separate requests of one prompt) costs one prefill row."""
    p, q = [1, 5, 6, 7], [1, 8]
    prompts = [p, p, q, p, q]
    rows: list[int] = []
    hook = model.register_forward_hook(
        lambda _m, _a, kw, _o: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            shared = DecodeBatch.prefill(model, prompts, all_logits=True)
    finally:
        hook.remove()
    assert rows == [2]
    assert shared.batch.size == 5
    assert shared.all_logits is not None
    assert shared.all_logits.shape[0] == 5
    for i, prompt in enumerate(prompts):
        assert torch.allclose(
            torch.log_softmax(shared.last_logits[i].float(), -1), _alone(model, prompt), atol=1e-5
        )
    assert torch.equal(shared.batch.positions, torch.tensor([4, 4, 2, 4, 2]))
    with torch.inference_mode():
        tokens = torch.tensor([9, 10, 11, 12, 13])
        shared.batch.last = tokens
        logits = torch.log_softmax(shared.batch.decode(model).float(), -1)
    for i, prompt in enumerate(prompts):
        assert torch.allclose(logits[i], _alone(model, [*prompt, int(tokens[i])]), atol=1e-5)
