"""What one request may ask: caps on n and sequences, text length, body size, JSON depth."""

from __future__ import annotations

import pytest
from starlette.types import Message
from transformers import PreTrainedTokenizerFast

from nexrl_async.core.errors import ConfigError, RequestRejected
from nexrl_async.inference.local import ServeOptions
from nexrl_async.inference.local.__main__ import parse_options
from nexrl_async.inference.local.app_state import longest_token
from nexrl_async.inference.local.http_io import (
    BodyTooLarge,
    ClientGone,
    JsonError,
    decode_json,
    read_body,
)
from nexrl_async.inference.local.protocol import (
    GenerateRequest,
    Limits,
    check_counts,
    check_text_length,
)

LIMITS = Limits(context_length=32, vocab_size=20, max_n=4, max_sequences=10, chars_per_token=3)


def _message(call: object, *args: object) -> str:
    with pytest.raises(RequestRejected) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.status_code == 400
    return info.value.message


def test_n_and_sequences_are_capped() -> None:
    check_counts(2, 4, LIMITS)
    assert _message(check_counts, 1, 5, LIMITS) == "n must be at most 4, got 5."
    assert "at most 10 sequences (prompts x n), got 12" in _message(check_counts, 3, 4, LIMITS)


def test_text_too_long_for_the_context_is_refused_by_its_length() -> None:
    check_text_length(["x" * 96], LIMITS)
    message = _message(check_text_length, ["ok", "x" * 97], LIMITS)
    assert message.startswith("The input (97 characters) is longer than the model's context")


def test_longest_token_bounds_characters_per_token(tokenizer: PreTrainedTokenizerFast) -> None:
    assert longest_token(tokenizer) == max(len(t) for t in tokenizer.get_vocab())
    assert longest_token(tokenizer) >= len("<pad>")


def _scope(length: int | None) -> dict[str, object]:
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    return {"type": "http", "headers": headers}


def _receiver(*chunks: bytes, disconnect: bool = False) -> object:
    messages: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    if disconnect:
        messages[-1:] = [{"type": "http.disconnect"}]

    async def receive() -> Message:
        return messages.pop(0)

    return receive


async def test_read_body_within_and_over_the_limit() -> None:
    assert await read_body(_scope(3), _receiver(b"abc"), 8) == b"abc"  # type: ignore[arg-type]
    assert await read_body(_scope(None), _receiver(b"ab", b"cd"), 8) == b"abcd"  # type: ignore[arg-type]
    with pytest.raises(BodyTooLarge, match="9 bytes"):
        await read_body(_scope(9), _receiver(), 8)  # type: ignore[arg-type]
    with pytest.raises(BodyTooLarge, match="limit of 8 bytes"):
        await read_body(_scope(None), _receiver(b"12345", b"6789", b""), 8)  # type: ignore[arg-type]
    with pytest.raises(ClientGone):
        await read_body(_scope(None), _receiver(b"12", b"", disconnect=True), 8)  # type: ignore[arg-type]


def test_deep_or_bad_json_is_a_json_error() -> None:
    assert decode_json(b'{"input_ids": [[1]]}', GenerateRequest).input_ids == [[1]]
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"input_ids": ' + b"[" * 50_000, b"{x"):
        with pytest.raises(JsonError):
            decode_json(raw, GenerateRequest)


def test_limit_options_parse_and_are_checked() -> None:
    argv = ["--model", "/m", "--max-body-bytes", "4096", "--max-n", "8"]
    options = parse_options([*argv, "--max-request-sequences", "100"])
    assert (options.max_body_bytes, options.max_n, options.max_request_sequences) == (4096, 8, 100)
    assert parse_options(["--model", "/m"]).max_body_bytes == 8 * 2**20
    with pytest.raises(ConfigError, match="max_n"):
        ServeOptions(model_dir="/m", max_n=0)
    with pytest.raises(ConfigError, match="max_body_bytes"):
        ServeOptions(model_dir="/m", max_body_bytes=10)
