"""Padding-free (packed) forward: a micro-batch's rows as one sequence that no attention crosses.

The rows of a micro-batch are concatenated into one ``[1, N]`` sequence (``N`` = their total
length) whose ``position_ids`` restart at 0 on every row, so RoPE sees each row exactly as
it would alone. Attention is confined to each row by one of three mechanisms, picked from the
model's attention implementation (``config._attn_implementation``):

- ``"varlen"`` (``flash_attention_2``/``_3`` and other flash kernels): no mask; the cumulative
  row lengths go to the model as ``cu_seq_lens_q/k`` and ``max_length_q/k``, which transformers
  forwards to every attention layer, and its flash wrapper then calls
  ``flash_attn_varlen_func`` (``modeling_flash_attention_utils._flash_attention_forward``,
  "padding free ... cu_seqlen and max_length are provided").
- ``"mask"`` (``sdpa``, ``eager``): an explicit block-diagonal causal mask ``[1, 1, N, N]``
  (boolean for SDPA, additive for eager). transformers returns a 4D ``attention_mask`` as it is
  (``masking_utils._preprocess_mask_arguments``: "If the mask is already 4D, simply return
  as-is"). Models with sliding-window layers get a ``{layer type: mask}`` mapping instead, which
  their ``forward`` takes as prepared masks. Exact: it is the padded computation without the
  padding.
- ``"positions"`` (any other implementation, e.g. flex attention): no mask and no cache, so
  transformers finds the rows itself from where ``position_ids`` restart
  (``masking_utils.find_packed_sequence_indices``). It needs ``use_cache=False``: with a cache
  that detection is skipped and rows would attend to each other.

Per-token values computed on the packed sequence go back to the ``[b, W]`` layout of the padded
micro-batch with :func:`unpack`.

The ``"mask"`` mechanism makes a packed micro-batch attend over all ``N²`` pairs of its
tokens, most of them between rows that never see each other. :func:`plan_costs` gives such a
model the cost model under which the planner (:func:`~nexrl_async.train.packing_plan.cheapest_plan`)
picks packed or bucketed padded micro-batches, whichever costs less; the other mechanisms
always pack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from nexrl_async.train.packing_plan import PlanCosts

Mechanism = Literal["varlen", "mask", "positions"]

_MASKED = frozenset({"sdpa", "eager"})
_SLIDING = "sliding_attention"

SOFTMAX_FLOPS = 5.0
"""Per (query, key) pair and head, beyond the two matmuls: mask, exp, normalisation."""
FORWARD_FLOPS_PER_LAYER = 2.5e7
"""What one micro-batch's forward and backward cost beyond their arithmetic, per layer, as
FLOPs (launches, Python, the loss): about 4-5 ms a micro-batch for the 2-layer demo model on
one CPU thread, where it computes ~30 GFLOP/s."""


@dataclass(frozen=True)
class PackedRows:
    """The rows of one micro-batch concatenated into one sequence, on the device."""

    input_ids: Tensor
    """``[1, N]`` int64: row after row, no padding."""
    position_ids: Tensor
    """``[1, N]`` int64: ``0..n_r-1`` for each row ``r``."""
    lengths: Tensor
    """``[b]`` int64 (CPU): tokens per row, each >= 1."""
    cu_seqlens: Tensor
    """``[b + 1]`` int32: where each row starts in the packed sequence, then ``N``."""
    index: Tensor
    """``[b, W]`` int64: packed position of ``(row, column)`` (clamped on padding)."""
    predicted: Tensor
    """``[b, W]`` bool: ``1 <= column < length``, the tokens that have a log-prob."""

    @property
    def total(self) -> int:
        """``N``: tokens in the packed sequence."""
        return int(self.input_ids.shape[1])

    @property
    def max_length(self) -> int:
        """The longest row."""
        return int(self.lengths.max())


def pack_rows(input_ids: Tensor, lengths: Tensor, device: torch.device) -> PackedRows:
    """Pack right-padded rows ``[b, W]`` (real tokens ``lengths[r]``, each >= 1) onto ``device``."""
    if input_ids.ndim != 2 or lengths.shape != input_ids.shape[:1]:
        raise ValueError(f"need [b, W] ids and [b] lengths; got {input_ids.shape}, {lengths.shape}")
    width = int(input_ids.shape[1])
    if lengths.numel() == 0 or int(lengths.min()) < 1 or int(lengths.max()) > width:
        raise ValueError(f"every row needs 1..{width} tokens; got lengths {lengths.tolist()}")
    lengths = lengths.to(torch.int64).cpu()
    columns = torch.arange(width)
    real = columns[None, :] < lengths[:, None]
    ends = lengths.cumsum(0)
    starts = ends - lengths
    total = int(ends[-1])
    index = (starts[:, None] + columns[None, :]).clamp_(max=total - 1)
    return PackedRows(
        input_ids=input_ids.cpu()[real][None].to(device, non_blocking=True),
        position_ids=columns.expand_as(real)[real][None].to(device, non_blocking=True),
        lengths=lengths,
        cu_seqlens=F.pad(ends, (1, 0)).to(device=device, dtype=torch.int32),
        index=index.to(device, non_blocking=True),
        predicted=(real & (columns[None, :] > 0)).to(device, non_blocking=True),
    )


def unpack(values: Tensor, packed: PackedRows) -> Tensor:
    """``[1, N]`` per packed token to ``[b, W]``; 0 in column 0 and on padding.

    Differentiable (a gather). Column 0 is dropped because the packed value there would come
    from the previous row's last position.
    """
    gathered = values[0][packed.index]
    return torch.where(packed.predicted, gathered, torch.zeros((), dtype=gathered.dtype))


def attention_mechanism(attn_implementation: str) -> Mechanism:
    """How a model with this ``config._attn_implementation`` keeps packed rows apart.

    Any name with "flash" in it is a flash kernel, as transformers decides
    (``utils.generic.is_flash_attention_requested``).
    """
    if "flash" in attn_implementation:
        return "varlen"
    if attn_implementation in _MASKED:
        return "mask"
    return "positions"


def plan_costs(model: PreTrainedModel) -> PlanCosts | None:
    """The cost model of ``model``'s micro-batches in forward FLOPs; ``None`` (always pack)
    unless its attention keeps packed rows apart with a dense mask (``"mask"``).

    A token slot costs ``2 ·`` the parameters it multiplies (every linear map and the LM
    head); an attention pair ``4 · head_dim`` per head and layer (scores and values) plus
    :data:`SOFTMAX_FLOPS`; a micro-batch :data:`FORWARD_FLOPS_PER_LAYER` per layer. The
    FLOPs ratio of pair to token is what measured times show on CPU (demo model: ~1/300).
    """
    config = model.config
    if attention_mechanism(str(config._attn_implementation)) != "mask":
        return None
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return PlanCosts(
        token=2.0 * _multiplied_parameters(model),
        pair=layers * heads * (4.0 * head_dim + SOFTMAX_FLOPS),
        forward=layers * FORWARD_FLOPS_PER_LAYER,
        dense=True,
    )


def _multiplied_parameters(model: PreTrainedModel) -> int:
    """Parameters a token is multiplied by: all but the input embedding (a lookup), unless
    the LM head shares it."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    weight = getattr(embedding, "weight", None)
    if weight is None or getattr(head, "weight", None) is weight:
        return total
    return total - weight.numel()


def packed_model_inputs(
    model: PreTrainedModel, packed: PackedRows, *, mechanism: Mechanism | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``model(**inputs)`` on the packed sequence (see module docstring).

    ``mechanism`` defaults to the one of the model's attention implementation.
    """
    config = model.config
    chosen = mechanism or attention_mechanism(str(config._attn_implementation))
    inputs: dict[str, Any] = {
        "input_ids": packed.input_ids,
        "position_ids": packed.position_ids,
        "use_cache": False,
    }
    if chosen == "varlen":
        inputs.update(
            cu_seq_lens_q=packed.cu_seqlens,
            cu_seq_lens_k=packed.cu_seqlens,
            max_length_q=packed.max_length,
            max_length_k=packed.max_length,
        )
    elif chosen == "mask":
        additive = config._attn_implementation == "eager"
        dtype = model.dtype if additive else None
        layer_types = list(getattr(config, "layer_types", None) or [])
        full = block_causal_mask(packed, dtype=dtype)
        if _SLIDING in layer_types:
            window = block_causal_mask(packed, dtype=dtype, window=int(config.sliding_window))
            inputs["attention_mask"] = {"full_attention": full, _SLIDING: window}
        else:
            inputs["attention_mask"] = full
    return inputs


def block_causal_mask(
    packed: PackedRows, *, dtype: torch.dtype | None = None, window: int | None = None
) -> Tensor:
    """``[1, 1, N, N]``: query ``i`` may see key ``j`` iff same row and ``j <= i``.

    With ``window`` also ``i - j < window`` (transformers' sliding window). Boolean (``True``
    = attend) when ``dtype`` is None, else additive: 0 or the dtype's minimum.
    """
    device = packed.input_ids.device
    rows = torch.repeat_interleave(
        torch.arange(packed.lengths.numel(), device=device), packed.lengths.to(device)
    )
    pos = packed.position_ids[0]
    allowed = (rows[:, None] == rows[None, :]) & (pos[:, None] >= pos[None, :])
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    allowed = allowed[None, None]
    if dtype is None:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def packed_logits(model: PreTrainedModel, packed: PackedRows) -> Tensor:
    """``[1, N, V]`` logits of the packed sequence, no position attending across rows."""
    out = model(**packed_model_inputs(model, packed))
    logits: Tensor = out.logits
    return logits
