from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nexrl_async.algorithms import aggregate, aggregation_denominator
from nexrl_async.algorithms.aggregation import AggMode

MODES: tuple[AggMode, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # ragged; last row empty

# Hand-computed: masked sum 1+2+3+5 = 11 over 4 tokens; row sums 6 and 5; row means 2 and 5;
# two non-empty rows; T = 4.
EXPECTED = {
    "token-mean": 11 / 4,
    "seq-mean-token-sum": (6 + 5) / 2,
    "seq-mean-token-mean": (2 + 5) / 2,
    "seq-mean-token-sum-norm": 11 / (2 * 4),
}


@pytest.mark.parametrize("mode", MODES)
def test_hand_computed(mode: AggMode) -> None:
    assert aggregate(VALUES, MASK, mode).item() == pytest.approx(EXPECTED[mode])


def test_modes_are_pairwise_different_on_a_ragged_mask() -> None:
    results = {mode: aggregate(VALUES, MASK, mode).item() for mode in MODES}
    for a, b in itertools.combinations(MODES, 2):
        assert results[a] != pytest.approx(results[b]), f"{a} and {b} agree"


def test_denominator_overrides_the_count() -> None:
    assert aggregate(VALUES, MASK, "token-mean", denominator=11).item() == pytest.approx(1.0)
    assert aggregate(VALUES, MASK, "seq-mean-token-sum", denominator=4).item() == pytest.approx(
        11 / 4
    )
    assert aggregate(VALUES, MASK, "seq-mean-token-mean", denominator=7).item() == pytest.approx(
        1.0
    )
    got = aggregate(VALUES, MASK, "seq-mean-token-sum-norm", denominator=4, norm_constant=11)
    assert got.item() == pytest.approx(11 / 44)
    tensor_den = aggregate(VALUES, MASK, "token-mean", denominator=torch.tensor(22.0))
    assert tensor_den.item() == pytest.approx(0.5)


def test_norm_constant() -> None:
    got = aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_constant=11)
    assert got.item() == pytest.approx(11 / (2 * 11))
    # Ignored by the other modes.
    assert aggregate(VALUES, MASK, "token-mean", norm_constant=11).item() == pytest.approx(2.75)


def test_aggregation_denominator() -> None:
    assert aggregation_denominator(MASK, "token-mean").item() == 4
    for mode in MODES[1:]:
        assert aggregation_denominator(MASK, mode).item() == 2


@pytest.mark.parametrize("mode", MODES)
def test_all_zero_mask_gives_zero_not_nan(mode: AggMode) -> None:
    values = torch.randn(3, 5, requires_grad=True)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    out = aggregate(values, mask, mode)
    assert out.item() == 0.0
    (grad,) = torch.autograd.grad(out, values)
    assert torch.equal(grad, torch.zeros(3, 5))
    assert aggregate(values, mask, mode, denominator=0).item() == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_masked_positions_never_leak(mode: AggMode) -> None:
    values = VALUES.clone()
    values[MASK == 0] = math.nan
    values[2, 0] = math.inf
    values.requires_grad_(True)
    out = aggregate(values, MASK, mode)
    assert out.item() == pytest.approx(EXPECTED[mode])
    (grad,) = torch.autograd.grad(out, values)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[MASK == 0], torch.zeros(int((MASK == 0).sum())))


def test_gradients_by_hand() -> None:
    values = VALUES.clone().requires_grad_(True)
    m = MASK.float()
    n = m.sum(dim=-1, keepdim=True).clamp(min=1)
    expected = {
        "token-mean": m / 4,
        "seq-mean-token-sum": m / 2,
        "seq-mean-token-mean": m / n / 2,
        "seq-mean-token-sum-norm": m / (2 * 4),
    }
    for mode in MODES:
        (grad,) = torch.autograd.grad(aggregate(values, MASK, mode), values)
        torch.testing.assert_close(grad, expected[mode])


def test_bool_and_float_masks_agree() -> None:
    for mode in MODES:
        a = aggregate(VALUES, MASK.bool(), mode)
        b = aggregate(VALUES, MASK.float(), mode)
        assert a.item() == b.item()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        aggregate(VALUES, MASK, "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        aggregate(VALUES, MASK[:, :2], "token-mean")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        aggregate(VALUES[0], MASK[0], "token-mean")
    with pytest.raises(ValueError, match="denominator"):
        aggregate(VALUES, MASK, "token-mean", denominator=-1)
    with pytest.raises(ValueError, match="scalar"):
        aggregate(VALUES, MASK, "token-mean", denominator=torch.ones(2))
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_constant=0)
    with pytest.raises(ValueError, match="mode"):
        aggregation_denominator(MASK, "mean")  # type: ignore[arg-type]


@st.composite
def sharded_batch(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    rows = draw(st.integers(1, 10))
    width = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    lengths = draw(st.lists(st.integers(0, width), min_size=rows, max_size=rows))
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    cuts = sorted(draw(st.lists(st.integers(0, rows), max_size=4)))
    return values, mask, cuts


@settings(max_examples=80, deadline=None)
@given(batch=sharded_batch(), mode=st.sampled_from(MODES))
def test_shards_with_global_denominator_sum_to_full_batch(
    batch: tuple[torch.Tensor, torch.Tensor, list[int]], mode: AggMode
) -> None:
    values, mask, cuts = batch
    width = mask.shape[-1]
    bounds = [0, *cuts, values.shape[0]]
    shards = [(values[a:b], mask[a:b]) for a, b in itertools.pairwise(bounds)]
    # Each shard is trimmed to its own padded width, as a micro-batch would be.
    trimmed: list[tuple[torch.Tensor, torch.Tensor]] = []
    for v, m in shards:
        keep = int(m.sum(dim=-1).max().item()) if m.numel() else 0
        trimmed.append((v[:, : max(keep, 1)], m[:, : max(keep, 1)]))
    global_den = torch.stack([aggregation_denominator(m, mode) for _, m in trimmed]).sum()
    total = torch.stack(
        [aggregate(v, m, mode, denominator=global_den, norm_constant=width) for v, m in trimmed]
    ).sum()
    full = aggregate(values, mask, mode, norm_constant=width)
    assert float(total) == pytest.approx(full.item(), abs=1e-9)
