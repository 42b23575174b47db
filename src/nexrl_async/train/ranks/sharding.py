"""FSDP2 over the training ranks: shard a model, and gather it back for export and sync.

```
shard_model(model, groups, param_dtype="bfloat16")   # fully_shard per decoder layer, then root
optimizer = build_optimizer(model.parameters(), cfg)  # after sharding: over the DTensor shards
state = full_state_dict(model)                        # every rank calls; rank 0 gets the tensors
```

- Each decoder layer is one FSDP unit (all-gathered for its forward and backward, resharded
  after), the root unit holds the embeddings, final norm and LM head (tied weights stay one
  parameter there).
- Gradients are *summed* over ranks, not averaged: every rank's loss is already divided by the
  global denominator (:mod:`.step`), so the sum is the full batch's gradient and world sizes 1
  and ``N`` give the same update. On CPU (gloo has no pre-multiplied sum) the reduction is a
  plain sum.
- On GPU with ``trainer.param_dtype = "bfloat16"`` the forward and backward run in bf16 while
  the sharded parameters (and the optimizer) stay float32 and gradients reduce in float32
  (``MixedPrecisionPolicy``). On CPU everything stays in the parameters' dtype.
- Gradient clipping works on the DTensor gradients as usual
  (``torch.nn.utils.clip_grad_norm_``); :func:`norm_value` turns the returned norm (a
  replicated DTensor) into a float.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from nexrl_async.core.errors import TrainError
from nexrl_async.train.ranks.topology import ProcessGroups


def mixed_precision(device: torch.device, param_dtype: str) -> MixedPrecisionPolicy:
    """bf16 compute with float32 reductions on CUDA when asked; the parameters' dtype otherwise."""
    if device.type == "cuda" and param_dtype == "bfloat16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules whose class is in ``_no_split_modules`` (HF), else
    the ``layers`` list of its base model.

    Raises:
        TrainError: no decoder layers were found.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if found:
        return found
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return list(layers)
    raise TrainError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def shard_model(
    model: nn.Module,
    groups: ProcessGroups,
    *,
    param_dtype: str = "float32",
    trainable: bool = True,
) -> None:
    """Apply FSDP2 in place: ``fully_shard`` on every decoder layer, then on the root.

    Call before building the optimizer, after activation checkpointing is enabled. A frozen
    model (``trainable=False``, the reference) is sharded the same way and only runs forwards.
    """
    if groups.mesh is None:
        raise TrainError("shard_model needs a process group mesh (world size > 1)")
    policy = mixed_precision(groups.device, param_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=groups.mesh, mp_policy=policy)
    fully_shard(model, mesh=groups.mesh, mp_policy=policy)
    if not trainable:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if groups.device.type != "cuda":
                module.set_force_sum_reduction_for_comms(True)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so FSDP2's hooks run inside)."""
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias).
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable):
        raise TrainError(f"{type(model).__name__} does not support activation checkpointing")
    enable()


def is_sharded(model: nn.Module) -> bool:
    """The model was sharded by :func:`shard_model`."""
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Free a sharded model's gathered parameters (no-op unsharded).

    FSDP2 keeps the root unit's parameters gathered after a forward (its backward would need
    them at once); after a no-grad forward nothing frees them, and until then
    ``model.parameters()`` yields the unsharded tensors instead of the DTensor shards.
    """
    if isinstance(model, FSDPModule):
        model.reshard()


def norm_value(norm: Tensor) -> float:
    """A gradient norm from ``clip_grad_norm_`` as a float (a DTensor is made whole first)."""
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The whole model's state dict on CPU at rank 0 (an empty dict on the other ranks).

    Every rank must call this (it all-gathers each parameter). Floating tensors are cast to
    ``dtype`` when given (e.g. float32 master weights exported as bf16).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, Tensor] = {}
    for key, value in get_model_state_dict(model, options=options).items():
        if not isinstance(value, Tensor):
            raise TrainError(f"unexpected {type(value).__name__} in the state dict at {key!r}")
        cast = dtype is not None and value.is_floating_point()
        state[key] = value.to(dtype) if cast else value
    return state


def gathered_parameters(
    model: nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Tensor]]:
    """``(HF name, full tensor)`` per parameter, one all-gather at a time, on every rank.

    Every rank must iterate it to the end in the same order (each step is a collective); tied
    weights appear once, as in ``named_parameters``. Tensors stay on the training device.
    """
    for name, param in model.named_parameters():
        data = param.detach()
        full = data.full_tensor() if isinstance(data, DTensor) else data
        yield name, full.to(dtype) if dtype is not None and full.is_floating_point() else full
