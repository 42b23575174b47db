"""Forward passes on the running batch's KV cache: transformers' own, or a lean one.

A forward takes new tokens ``ids [B, L]`` (left-padded), the attention mask over cache plus new
columns ``mask [B, T + L]`` (1 = a real token), the RoPE ``positions [B, L]`` and the cache
(per layer ``(keys, values)``, each ``[B, H_kv, T, D]``; empty for a prefill), and returns the
logits (``[B, L, V]`` or, with ``last_only``, ``[B, 1, V]``) and the grown cache.

:class:`HFForward` calls the model as transformers does (any causal LM). :class:`LeanForward`
computes the same function for Llama-style decoders (Llama, Qwen2: RMSNorm, RoPE with the
default schedule, grouped-query attention, SwiGLU MLP, no sliding window) with plain torch ops
on the model's own modules (weight updates, done in place, apply at once). It skips what costs
more than the math on small models: the per-call mask construction, cache objects, output
dataclasses and decorators, about 1.5 ms a forward on the CPU demo's model. Padded query
positions attend to themselves only, so every row stays finite.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

KV = list[tuple[torch.Tensor, torch.Tensor]]

_LEAN_TYPES = ("llama", "qwen2")


class Forward(Protocol):
    device: torch.device

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv: KV, *,
        last_only: bool,
    ) -> tuple[torch.Tensor, KV]: ...  # fmt: skip


def _layers(cache: Any) -> KV:
    return [(k, v) for k, v, *_ in cache]


class HFForward:
    """The model's own forward (any architecture)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = model.device

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv: KV, *,
        last_only: bool,
    ) -> tuple[torch.Tensor, KV]:  # fmt: skip
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=DynamicCache(ddp_cache_data=kv) if kv else DynamicCache(),
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        return out.logits, _layers(out.past_key_values)


def lean_supported(model: PreTrainedModel) -> bool:
    """Whether :class:`LeanForward` computes exactly this model's function."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    checks = (
        config.model_type in _LEAN_TYPES,
        rope.get("rope_type", "default") == "default",
        not getattr(config, "use_sliding_window", False),
        getattr(config, "hidden_act", "silu") == "silu",
        getattr(config, "pretraining_tp", 1) == 1,
        not getattr(config, "mlp_bias", False),
    )
    return all(checks)


class LeanForward:
    """The Llama / Qwen2 decoder with plain torch ops (see the module docstring)."""

    def __init__(self, model: PreTrainedModel) -> None:
        config = model.config
        inner = model.model
        self.device = model.device
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        rotary = inner.rotary_emb
        self.inv_freq: torch.Tensor = rotary.inv_freq
        self.rope_scale = float(rotary.attention_scaling)

    def _rms(self, norm: Any, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return norm.weight * h.to(x.dtype)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(dtype)[:, None]
        sin = (emb.sin() * self.rope_scale).to(dtype)[:, None]
        return cos, sin

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _attention(
        self, layer: Any, x: torch.Tensor, rope: tuple[torch.Tensor, ...], allowed: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        attn = layer.self_attn
        b, length, _ = x.shape
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias)
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias)
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias)
        q = q.view(b, length, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rotate(q, *rope), self._rotate(k, *rope)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        groups = self.heads // self.kv_heads
        keys = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        values = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=allowed, scale=self.head_dim**-0.5
        )
        out = out.transpose(1, 2).reshape(b, length, -1)
        return F.linear(out, attn.o_proj.weight, attn.o_proj.bias), (k, v)

    @staticmethod
    def _allowed(mask: torch.Tensor, length: int) -> torch.Tensor:
        """``[B, 1, L, T + L]`` bool: real keys at or before each query, and the query itself."""
        total = mask.shape[1]
        cols = torch.arange(total, device=mask.device)
        rows = torch.arange(total - length, total, device=mask.device)
        causal = cols[None, :] <= rows[:, None]
        own = cols[None, :] == rows[:, None]
        return ((mask.bool()[:, None, None, :] & causal) | own).contiguous()

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv: KV, *,
        last_only: bool,
    ) -> tuple[torch.Tensor, KV]:  # fmt: skip
        x = self.embed(ids)
        rope = self._rope(positions, x.dtype)
        allowed = self._allowed(mask, ids.shape[1])
        grown: KV = []
        for i, layer in enumerate(self.layers):
            h, cache = self._attention(
                layer, self._rms(layer.input_layernorm, x), rope, allowed, kv[i] if kv else None
            )
            grown.append(cache)
            x = x + h
            mlp = layer.mlp
            h = self._rms(layer.post_attention_layernorm, x)
            gate = F.silu(F.linear(h, mlp.gate_proj.weight))
            x = x + F.linear(gate * F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight)
        if last_only:
            x = x[:, -1:]
        return F.linear(self._rms(self.norm, x), self.lm_head.weight, self.lm_head.bias), grown


def forward_for(model: PreTrainedModel, *, lean: bool = True) -> Forward:
    """The lean forward where it applies (and ``lean``), transformers' otherwise."""
    if lean and lean_supported(model):
        return LeanForward(model)
    return HFForward(model)
