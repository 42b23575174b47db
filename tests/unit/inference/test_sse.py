"""SSE decoding: events, multi-line data, comments, flush at end of stream."""

from __future__ import annotations

from nexrl_async.inference.client.sse import DONE, SSEDecoder, encode_event


def feed_all(text: str) -> list[str]:
    decoder = SSEDecoder()
    events = [e for line in text.split("\n") if (e := decoder.feed(line)) is not None]
    if (last := decoder.flush()) is not None:
        events.append(last)
    return events


def test_events_are_split_at_blank_lines() -> None:
    assert feed_all('data: {"a": 1}\n\ndata: [DONE]\n\n') == ['{"a": 1}', DONE]


def test_multi_line_data_is_joined_and_comments_ignored() -> None:
    text = ": keep-alive\n\ndata: line1\ndata: line2\nevent: message\nid: 3\n\n"
    assert feed_all(text) == ["line1\nline2"]


def test_data_without_space_and_unterminated_last_event() -> None:
    assert feed_all("data:x\n\ndata: y") == ["x", "y"]


def test_blank_lines_alone_produce_nothing() -> None:
    assert feed_all("\n\n\n") == []


def test_encode_round_trips() -> None:
    raw = (encode_event('{"k": "v"}') + encode_event(DONE)).decode()
    assert feed_all(raw) == ['{"k": "v"}', DONE]


def test_text_split_anywhere_gives_the_same_events() -> None:
    raw = 'data: {"a": 1}\r\n\r\ndata: two\rdata: lines\r\r: note\n\ndata: [DONE]\n\n'
    whole = SSEDecoder().feed_text(raw)
    assert whole == ['{"a": 1}', "two\nlines", DONE]
    for cut in range(len(raw) + 1):
        decoder = SSEDecoder()
        pieces = decoder.feed_text(raw[:cut]) + decoder.feed_text(raw[cut:])
        assert pieces == whole, cut
    one_by_one = SSEDecoder()
    assert [e for ch in raw for e in one_by_one.feed_text(ch)] == whole


def test_flush_returns_an_unterminated_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_text("data: tail\r") == []
    assert decoder.flush() == "tail"
