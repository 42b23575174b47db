"""Prefix sharing: shared prompts computed once give the padded forward's log-probs and grads."""

from __future__ import annotations

import pytest
import torch
from tiny_train import tiny_policy
from torch import Tensor
from transformers import PreTrainedModel

from nexrl_async.train.logprobs import forward_logprobs
from nexrl_async.train.microbatch import MicroBatch, collate
from nexrl_async.train.prefix_sharing import (
    plan_shared_prefix,
    prefix_lengths,
    shares_prefixes,
)
from nexrl_async.train.tensors import SequenceBatch

CPU = torch.device("cpu")


def _batch(prompts: list[list[int]], group_size: int, seed: int = 0) -> SequenceBatch:
    """Each prompt followed by ``group_size`` random responses of 1-4 tokens, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    rows, groups = [], []
    for g, prompt in enumerate(prompts):
        for _ in range(group_size):
            n = int(torch.randint(1, 5, (1,), generator=gen))
            rows.append(prompt + torch.randint(3, 12, (n,), generator=gen).tolist())
            groups.append(g)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    real = torch.arange(width)[None, :] < lengths[:, None]
    loss = torch.zeros(ids.shape)
    for i, prompt in enumerate(r for r in prompts for _ in range(group_size)):
        loss[i, len(prompt) : int(lengths[i])] = 1.0
    return SequenceBatch(
        input_ids=ids,
        attention_mask=real.long(),
        loss_mask=loss,
        rollout_logprobs=torch.zeros(ids.shape),
        rollout_mask=loss != 0,
        lengths=lengths,
        rewards=torch.zeros(len(rows)),
        group_index=torch.tensor(groups),
        response_lengths=lengths,
    )


def _logprobs_and_grads(
    model: PreTrainedModel, mb: MicroBatch, loss_mask: Tensor
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    logprobs, entropy = forward_logprobs(model, mb, temperature=0.7, with_entropy=True)
    assert entropy is not None
    ((logprobs * loss_mask).sum() + 0.1 * (entropy * loss_mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), entropy.detach(), grads


PROMPTS = {
    "equal prompts": [[1, 5, 6, 3], [1, 7, 2, 3], [1, 4, 4, 3]],
    "unequal prompts": [[1, 5, 3], [1, 7, 2, 9, 8, 3], [1, 4, 3, 6]],
}


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_shared_forward_matches_padded(architecture: str, case: str) -> None:
    model = tiny_policy(architecture)
    seq = _batch(PROMPTS[case], group_size=5)
    rows = list(range(seq.size))
    padded = collate(seq, rows, CPU, packing=False)
    shared = collate(seq, rows, CPU, packing=False, share_prefix=True)
    assert padded.shared is None
    assert shared.shared is not None
    assert shared.shared.prefix_ids.shape[0] == len(PROMPTS[case])
    loss = seq.loss_mask
    lp_a, ent_a, grads_a = _logprobs_and_grads(model, padded, loss)
    lp_b, ent_b, grads_b = _logprobs_and_grads(model, shared, loss)
    real = seq.attention_mask.bool() & (torch.arange(seq.width) > 0)
    torch.testing.assert_close(lp_b[real], lp_a[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_b[real], ent_a[real], atol=1e-5, rtol=1e-5)
    assert (lp_b[~real] == 0).all()
    assert grads_a
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_prefix_lengths_stop_before_each_rows_last_token() -> None:
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 0], [1, 2, 9, 9], [5, 6, 7, 8], [1, 2, 3, 4]])
    lengths = torch.tensor([4, 3, 4, 4, 4])
    groups = torch.tensor([0, 0, 0, 1, 2])
    # group 0: common prefix [1, 2] (row 2 differs at 2); rows alone share nothing
    assert prefix_lengths(ids, lengths, groups).tolist() == [2, 2, 2, 0, 0]
    same = torch.tensor([[1, 2, 3], [1, 2, 3]])
    # identical rows keep their last token out of the prefix
    assert prefix_lengths(same, torch.tensor([3, 3]), torch.tensor([0, 0])).tolist() == [2, 2]


def test_no_shared_layout_where_it_does_not_pay() -> None:
    seq = _batch([[1, 5, 6, 3], [1, 7, 2, 3]], group_size=4)
    lone = seq.group_index.clone()
    lone[0] = 99  # a row alone in its group shares nothing: the padded forward is kept
    assert plan_shared_prefix(seq.input_ids, seq.lengths, lone, CPU) is None
    short = _batch([[1], [2]], group_size=4)  # one-token prompts save too little
    assert plan_shared_prefix(short.input_ids, short.lengths, short.group_index, CPU) is None
    assert plan_shared_prefix(seq.input_ids, seq.lengths, seq.group_index, CPU) is not None


def test_packed_micro_batches_are_never_shared() -> None:
    seq = _batch([[1, 5, 6, 3]], group_size=4)
    assert collate(seq, range(seq.size), CPU, packing=True, share_prefix=True).shared is None


def test_activation_checkpointing_turns_sharing_off() -> None:
    model = tiny_policy()
    assert shares_prefixes(model)
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    assert not shares_prefixes(model)


@pytest.mark.parametrize(
    "layer_types", [["full_attention", "sliding_attention"], ["linear_attention", "full_attention"]]
)
def test_layers_other_than_full_attention_turn_sharing_off(layer_types: list[str]) -> None:
    model = tiny_policy()
    model.config.layer_types = layer_types
    assert not shares_prefixes(model)
    model.config.layer_types = ["full_attention", "full_attention"]
    assert shares_prefixes(model)
