"""Messages to token ids: the prompt once, then only the tokens each follow-up message adds.

The agent loop never re-tokenizes history (docs/architecture.md §2): the context is the prompt's
ids, then every assistant turn's ids exactly as generated, then the ids of whatever follows
(tool results, environment feedback), and so on. Only that last part needs rendering, and
:meth:`ChatRenderer.followup` renders just it.

How the follow-up delta is found (chat templates render whole conversations, not pieces): the
new messages are rendered after a fixed two-message *anchor* conversation, ``[user ".",
assistant <marker>]``, with the generation prompt on. Everything after the marker is the end
of the anchor's assistant message (e.g. ``<|im_end|>\\n``) followed by the new messages and
the next generation prompt (``<|im_start|>assistant\\n``). The end-of-message part the model
already generated (its stop token, say) is then cut off: the longest run of the turn's last
generated tokens whose decoded text starts the rendered remainder. What is left is tokenized
without special tokens added and appended. Because the anchor is fixed, the delta does not
depend on the history (templates that render earlier turns differently once a turn is no
longer last, like Qwen3's thinking blocks, cannot break the prefix). Templates that reject
the anchor (e.g. ones requiring ``tool_call_id`` s) need a worker that overrides
``render_followup``.

Without a chat template (``rollout.apply_chat_template = false``) message contents are joined
with newlines and encoded as plain text.

Where tokenizer work runs (:meth:`ChatRenderer.run`): a thread hop costs the event loop about
110 µs of CPU and the caller about 260 µs of latency (measured on the 2-core CPU box), so work
cheaper than that runs on the loop and the rest in the renderer's worker thread:

- decodes of at most :data:`INLINE_DECODE_TOKENS` tokens run inline (the raw and the clean text
  of 256 tokens take about 120 µs; the demo's 3 tokens 12 µs);
- renders without a chat template of at most :data:`INLINE_RENDER_CHARS` characters of message
  content run inline (the demo's prompt: about 50 µs);
- chat-template renders always go to the thread (jinja alone takes 250-550 µs for short
  messages), as does everything larger. The worker renders a group's shared prompt once.

A lock keeps the tokenizer to one thread at a time (fast HF tokenizers must not be used by two
threads at once): inline work takes it without waiting, or goes to the thread when the thread
holds it. So one renderer may serve every concurrent sample.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from nexrl_async.core.errors import RolloutError
from nexrl_async.core.token_codec import TokenCodec
from nexrl_async.rollout.tools import Message

T = TypeVar("T")

ANCHOR_MARKER = "NEXRL_ANCHOR_TURN"
"""Content of the anchor assistant message; located in the rendered text."""
_MAX_OVERLAP_TOKENS = 8
"""How many trailing generated tokens may overlap the template's end-of-message text."""
INLINE_DECODE_TOKENS = 256
"""Decodes of at most this many tokens run on the event loop (see the module docstring)."""
INLINE_RENDER_CHARS = 256
"""Plain-text renders of at most this many content characters run on the event loop."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the renderer uses."""

    def encode(self, *args: Any, **kwargs: Any) -> Any: ...

    def decode(self, *args: Any, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any: ...


class ChatRenderer:
    """Renders prompts and follow-up messages to ids with one tokenizer.

    ``tools`` are the tool schemas passed to the chat template as ``tools=``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        apply_chat_template: bool = True,
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.codec = TokenCodec(tokenizer)
        """Encodes and decodes through the Rust tokenizer where that is exact."""
        self.apply_chat_template = apply_chat_template
        self.tools = [dict(t) for t in tools]
        self._limiter = anyio.CapacityLimiter(1)
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """``fn(*args)`` (tokenizer work): on the event loop when ``inline`` and no thread holds
        the tokenizer, else in the renderer's single worker thread slot."""
        if inline and self._lock.acquire(blocking=False):
            try:
                return fn(*args)
            finally:
                self._lock.release()
        call = functools.partial(self._locked, fn, *args)
        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            return fn(*args)

    def renders_inline(self, messages: Sequence[Message]) -> bool:
        """Whether rendering ``messages`` is cheap enough for the event loop."""
        if self.apply_chat_template:
            return False
        return sum(len(str(m.get("content") or "")) for m in messages) <= INLINE_RENDER_CHARS

    @staticmethod
    def decodes_inline(ids: Sequence[int]) -> bool:
        """Whether decoding ``ids`` is cheap enough for the event loop."""
        return len(ids) <= INLINE_DECODE_TOKENS

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """The ids of the whole prompt, ending with the generation prompt."""
        if not self.apply_chat_template:
            return self.encode(_joined(messages))
        out = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tools=self.tools or None,
            add_generation_prompt=True,
            tokenize=True,
        )
        return as_token_ids(out)

    def conversation(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> list[int]:
        """The ids of the whole conversation rendered at once (the reference of the token-exact
        check, ``transcript.py``); needs a chat template."""
        if not self.apply_chat_template:
            raise RolloutError("rendering a whole conversation needs a chat template")
        out = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tools=self.tools or None,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
        )
        return as_token_ids(out)

    def followup(self, messages: Sequence[Message], generated_ids: Sequence[int]) -> list[int]:
        """The ids that ``messages`` add after an assistant turn that generated
        ``generated_ids``, ending with the next generation prompt (see the module docstring)."""
        if not self.apply_chat_template:
            return self.encode(_joined(messages))
        anchor: list[Message] = [
            {"role": "user", "content": "."},
            {"role": "assistant", "content": ANCHOR_MARKER},
        ]
        text = self.tokenizer.apply_chat_template(
            anchor + [dict(m) for m in messages],
            tools=self.tools or None,
            add_generation_prompt=True,
            tokenize=False,
        )
        if not isinstance(text, str) or ANCHOR_MARKER not in text:
            raise RolloutError(
                "the chat template does not render assistant content verbatim; "
                "override render_followup in a custom worker"
            )
        rest = text[text.index(ANCHOR_MARKER) + len(ANCHOR_MARKER) :]
        return self.encode(rest[self._overlap(rest, generated_ids) :])

    def _overlap(self, rest: str, generated_ids: Sequence[int]) -> int:
        """Length of the longest text of whole trailing generated tokens that starts ``rest``."""
        best = 0
        for n in range(1, min(_MAX_OVERLAP_TOKENS, len(generated_ids)) + 1):
            tail = self.decode(generated_ids[-n:], skip_special_tokens=False)
            if tail and rest.startswith(tail):
                best = len(tail)
        return best

    def encode(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        text = self.codec.decode(ids, skip_special_tokens=skip_special_tokens)
        if not isinstance(text, str):
            raise RolloutError(f"tokenizer.decode returned {type(text).__name__}, not str")
        return text


def _joined(messages: Sequence[Message]) -> str:
    return "\n".join(str(m.get("content") or "") for m in messages)


def as_token_ids(out: Any) -> list[int]:
    """Token ids from whatever ``encode``/``apply_chat_template`` (or a render hook) returned:
    a list, a tensor or array, or a mapping with ``input_ids``; else :class:`RolloutError`."""
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if isinstance(out, list) and out and isinstance(out[0], list):
        if len(out) != 1:
            raise RolloutError(f"expected one sequence of token ids, got {len(out)}")
        out = out[0]
    if not isinstance(out, list) or not all(isinstance(t, int) for t in out):
        raise RolloutError(f"expected a list of token ids, got {type(out).__name__}")
    return out
