"""What every route handler needs: the scheduler, the tokenizer and the served model's facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase as Tokenizer

from nexrl_async.core.errors import RequestRejected
from nexrl_async.inference.local.protocol import Limits, check_text_length
from nexrl_async.inference.local.scheduler import Scheduler
from nexrl_async.inference.local.streaming import SlowWatch
from nexrl_async.inference.local.update_group import WeightSyncState


@dataclass(kw_only=True)
class ServerContext:
    scheduler: Scheduler
    tokenizer: Tokenizer
    limits: Limits
    served_model_name: str | None
    """``--served-model-name``; None means "the current model path" (SGLang's default)."""
    tokenizer_path: str
    model_type: str
    architectures: list[str]
    sampling_defaults: dict[str, Any]
    """Sampling defaults from ``generation_config.json`` (chat / completions only)."""
    server_args: dict[str, Any]
    weight_sync: WeightSyncState
    """Distributed weight updates: joined process groups and the update session."""
    watch: SlowWatch = field(default_factory=SlowWatch)
    """Disconnect watchers for slow answers; its ``run`` belongs in the server's task group."""
    shutting_down: bool = False
    _token_text: dict[int, str] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.scheduler.model_path

    def token_text(self, token: int) -> str:
        """Decoded text of one token id (cached)."""
        text = self._token_text.get(token)
        if text is None:
            text = str(self.tokenizer.decode([token]))
            self._token_text[token] = text
        return text

    async def encode(self, texts: list[str]) -> list[list[int]]:
        """Tokenize with the tokenizer's default special tokens (BOS as the tokenizer adds it).

        Texts that cannot fit the context are refused first (``RequestRejected``)."""
        check_text_length(texts, self.limits)

        def run() -> list[list[int]]:
            return [list(self.tokenizer(t)["input_ids"]) for t in texts]

        return await anyio.to_thread.run_sync(run)

    async def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None,
        continue_final_message: bool,
        template_kwargs: dict[str, Any],
    ) -> list[int]:
        """Apply the tokenizer's chat template (generation prompt added) and tokenize."""

        options: dict[str, Any] = {"tools": tools, **template_kwargs}

        def run() -> list[int]:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message,
                **options,
            )
            check_text_length([str(text)], self.limits)
            return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

        try:
            return await anyio.to_thread.run_sync(run)
        except RequestRejected:
            raise
        except (ValueError, TypeError, KeyError, RecursionError, TemplateError) as err:
            raise RequestRejected(400, f"cannot apply the chat template: {err}") from err


def longest_token(tokenizer: Tokenizer) -> int:
    """Characters of the longest vocabulary entry (at least 1): no token stands for more."""
    vocab = tokenizer.get_vocab()
    return max((len(token) for token in vocab), default=1) or 1
