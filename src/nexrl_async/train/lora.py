"""LoRA adapters on the policy through peft: wrap it, count what trains, merge for servers.

```
model = apply_lora(model, LoraConfig(rank=8), seed=0)     # a peft model: only A and B train
merged = dict(merged_parameters(model, model.named_parameters()))   # HF names, W + s·B·A
save_merged(model, folder, model.state_dict())           # HF folder + folder/adapter
metrics = footprint(model, optimizer)                      # train/params_trainable, ...
```

peft is imported only when a recipe asks for adapters (the ``lora`` extra). The wrapped
model is a ``peft.PeftModel``: its parameter names carry peft's prefixes
(``base_model.model.<hf name>``, ``<layer>.base_layer.weight``, ``<layer>.lora_A.default.weight``).
Everything that leaves the trainer for a server or an HF folder goes through
:func:`merged_parameters`, which folds each adapter into its layer, ``W + s B A`` (computed in
float32, cast back to ``W``'s dtype), and gives the plain model's names: servers load it like
any checkpoint of the base architecture. The merge works on a stream of ``(name, tensor)`` pairs
(the model's own, or the gathered parameters of an FSDP2-sharded model), never changes the
trainer's weights (no merge-then-unmerge drift), and holds one layer's tensors at a time.

Only linear layers that own their weight take adapters (``all-linear`` leaves the LM head out);
anything else is a ``ConfigError`` naming ``model.lora.target_modules``. Adapter initialisation
runs under a forked RNG seeded from ``run.seed``: the same recipe gives the same adapters, and
the process's RNG is left as it was. The adapters take the base layers' dtype (one dtype per
FSDP2 unit).
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from loguru import logger
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import PreTrainedModel

from nexrl_async.config.model import LoraConfig
from nexrl_async.core.errors import ConfigError, TrainError

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER = "default"
"""peft's name of the one adapter the trainer trains."""
ADAPTER_DIR = "adapter"
"""The peft adapter folder inside an exported HF folder (``PeftModel.from_pretrained`` loads
it on top of the base model)."""
PREFIX = "base_model.model."
"""What peft puts in front of the wrapped model's parameter names."""

SEED_OFFSET = 0x4C6F5241
"""Added to ``run.seed`` for the adapters' initialisation: a stream apart from a built model's."""

_PART = re.compile(rf"^(?P<layer>.+)\.(?P<part>base_layer\.weight|lora_[AB]\.{ADAPTER}\.weight)$")
_TARGETS_PATH = "model.lora.target_modules"


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, *, seed: int) -> PreTrainedModel:
    """Wrap ``model`` (in place) with the adapters ``cfg`` asks for; freeze everything else.

    Raises:
        ConfigError: no layer matches ``target_modules``, or one that matches is not a linear
            layer owning its weight (an embedding, a tied LM head).
    """
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as err:
        raise ConfigError(
            f"[model.lora] needs peft ({err}): pip install 'nexrl-async[lora]'", path="model.lora"
        ) from err
    targets = cfg.target_modules
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # annotated int; used as alpha / r
        lora_dropout=cfg.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        use_rslora=cfg.rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing (one FutureWarning a run)
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        # a tied LM head as a target is refused below, with the field path
        warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`")
        torch.manual_seed(seed + SEED_OFFSET)
        try:
            wrapped = get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)
        except ValueError as err:
            raise ConfigError(f"{_TARGETS_PATH} = {targets!r}: {err}", path=_TARGETS_PATH) from err
    _check_layers(wrapped)
    counts = footprint(wrapped)
    logger.info(
        "LoRA rank {} alpha {:g} on {} layers: {:.0f} trainable parameters of {:.0f} ({:.2%})",
        cfg.rank,
        cfg.alpha,
        len(lora_layers(wrapped)),
        counts["train/params_trainable"],
        counts["train/params_model"],
        counts["train/params_trainable_frac"],
    )
    return wrapped  # type: ignore[return-value]  # a PeftModel forwards the model's API


def is_lora(model: nn.Module) -> bool:
    """``model`` was wrapped by :func:`apply_lora` (never true while peft is not imported:
    full fine-tuning needs no peft)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def lora_layers(model: nn.Module) -> dict[str, float]:
    """``{layer name: scaling s}`` of every adapted layer, in the wrapped model's naming."""
    from peft.tuners.lora import LoraLayer

    return {
        name: float(module.scaling[ADAPTER])
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }


def _check_layers(model: nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        short = name.removeprefix(PREFIX)
        if type(base) is not nn.Linear or getattr(module, "fan_in_fan_out", False):
            raise ConfigError(
                f"{_TARGETS_PATH}: {short} ({type(base).__name__}) is not a linear layer; "
                "only linear layers take adapters",
                path=_TARGETS_PATH,
            )
        if id(base.weight) in tied:
            raise ConfigError(
                f"{_TARGETS_PATH}: {short} shares its weight with the input embedding (tied); "
                "leave it out",
                path=_TARGETS_PATH,
            )


def hf_name(name: str) -> str:
    """The plain model's name of a wrapped model's parameter or buffer."""
    return name.removeprefix(PREFIX).replace(".base_layer.", ".")


def merged_parameters(
    model: nn.Module, named: Iterable[tuple[str, Tensor]]
) -> Iterator[tuple[str, Tensor]]:
    """``named`` (the wrapped model's names, in its ``named_parameters`` order, whole tensors)
    with every adapter folded into its layer: ``(HF name, tensor)`` of the plain model.

    A model without adapters passes through unchanged. Raises ``TrainError`` when a layer's
    weight, ``A`` or ``B`` is missing from ``named`` (the stream ended early).
    """
    if not is_lora(model):
        yield from named
        return
    scaling = lora_layers(model)
    pending: dict[str, dict[str, Tensor]] = {}
    for name, tensor in named:
        match = _PART.match(name)
        layer = match["layer"] if match else None
        if match is None or layer not in scaling:
            yield hf_name(name), tensor
            continue
        parts = pending.setdefault(layer, {})
        parts[match["part"].split(".")[0]] = tensor
        if len(parts) == 3:
            del pending[layer]
            yield f"{hf_name(layer)}.weight", _merge(parts, scaling[layer])
    if pending:
        raise TrainError(f"LoRA merge: incomplete layers {sorted(pending)[:3]}")


def merged_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A whole state dict (the wrapped model's names) merged as :func:`merged_parameters`."""
    return dict(merged_parameters(model, state.items()))


def _merge(parts: Mapping[str, Tensor], scale: float) -> Tensor:
    weight, a, b = parts["base_layer"], parts["lora_A"], parts["lora_B"]
    delta = (b.detach().float() @ a.detach().float()) * scale
    return (weight.detach().float() + delta).to(weight.dtype)


def adapter_state(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The adapters' tensors of a wrapped model's state dict (the checkpointed part)."""
    return {name: t for name, t in state.items() if ".lora_A." in name or ".lora_B." in name}


def save_merged(model: nn.Module, folder: Path, state: Mapping[str, Tensor]) -> None:
    """Write the merged plain model (``save_pretrained``) into ``folder`` and the peft adapter
    folder (``adapter_config.json``, ``adapter_model.safetensors``) into ``folder/adapter``.

    ``state``: the wrapped model's state dict, whole tensors (a sharded model's gathered one).
    """
    if not is_lora(model):
        raise TrainError("save_merged needs a model wrapped by apply_lora")
    peft_model = cast("PeftModel", model)
    merged = merged_state_dict(model, state)
    base = cast(PreTrainedModel, peft_model.get_base_model())
    base.save_pretrained(folder, state_dict=merged)
    tensors = {name: t.detach().contiguous() for name, t in adapter_state(model, state).items()}
    # save_embedding_layers=False: "auto" may look the base model up on the Hub
    peft_model.save_pretrained(
        str(folder / ADAPTER_DIR), state_dict=tensors, save_embedding_layers=False
    )


def footprint(model: nn.Module, optimizer: Optimizer | None = None) -> dict[str, float]:
    """Parameters (all ranks together) and optimizer state of the policy, as metrics.

    ``train/params_model``: the model's parameters without adapters; ``train/params_trainable``
    and its fraction of ``params_model``; ``train/optim_state_mb``: the optimizer's state
    tensors (AdamW's two moments and step counts), MiB, summed over ranks' shards.
    """
    total = trainable = adapters = 0
    for name, param in model.named_parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
        adapters += param.numel() if (".lora_A." in name or ".lora_B." in name) else 0
    metrics = {
        "train/params_model": float(total - adapters),
        "train/params_trainable": float(trainable),
        "train/params_trainable_frac": trainable / max(total - adapters, 1),
    }
    if optimizer is not None:
        state_bytes = sum(
            value.numel() * value.element_size()
            for state in optimizer.state.values()
            for value in state.values()
            if isinstance(value, Tensor)
        )
        metrics["train/optim_state_mb"] = state_bytes / 2**20
    return metrics
