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

Tokenizer calls run in a worker thread, one at a time (fast HF tokenizers must not be used by
two threads at once), so one renderer may serve every concurrent sample.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from nexrl_async.core.errors import RolloutError
from nexrl_async.rollout.tools import Message

T = TypeVar("T")

ANCHOR_MARKER = "NEXRL_ANCHOR_TURN"
"""Content of the anchor assistant message; located in the rendered text."""
_MAX_OVERLAP_TOKENS = 8
"""How many trailing generated tokens may overlap the template's end-of-message text."""


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
        self.apply_chat_template = apply_chat_template
        self.tools = [dict(t) for t in tools]
        self._limiter = anyio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (tokenizer work) in the renderer's single worker thread slot."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._limiter)

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
        return as_token_ids(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
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
