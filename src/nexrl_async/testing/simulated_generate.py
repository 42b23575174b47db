"""``POST /generate`` of the simulated SGLang server: request checks, responses, SSE streams.

Shapes follow docs/sglang_api.md §2 and §7: a single prompt with ``n == 1`` answers one JSON
object, a batch or ``n > 1`` a prompt-major list; streams are ``data: <json>`` events ending
with ``data: [DONE]`` (batch events carry ``index``); schema violations answer
``400 {"error": "<text>"}``, value errors ``400 {"error": {"message": ...}}``, an unparseable
body the ``{"object": "error", ...}`` envelope.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import msgspec
from msgspec import Struct
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from nexrl_async.inference.client.sse import DONE, encode_event
from nexrl_async.inference.local.sglang_schema import (
    SamplingParamsBody,
    length_error,
    min_new_error,
    range_error,
)
from nexrl_async.testing.simulated_engine import SamplingSpec, SimRequest, SimulatedEngine
from nexrl_async.testing.simulated_responses import (
    bad_request,
    fault_response,
    json_response,
    read_json,
    schema_error,
    value_error,
)


class GenerateJob(Struct, kw_only=True):
    """A parsed ``/generate`` request: its samples in response order."""

    requests: list[SimRequest]
    batch: bool
    stream: bool
    return_logprob: bool
    interval: int


def _prompts(body: dict[str, Any], vocab: int) -> tuple[list[Any], bool] | str:
    """Prompt ids per batch item and whether the request is a batch, or an error message.

    ``text`` (no tokenizer here) is mapped to its utf-8 bytes; ``input_ids`` wins over it.
    """
    ids = body.get("input_ids")
    text = body.get("text")
    if ids is None and text is None:
        return "Either text, input_ids or input_embeds should be provided."
    if ids is None:
        texts = text if isinstance(text, list) else [text]
        return [[b % vocab for b in str(t).encode()] for t in texts], isinstance(text, list)
    if not isinstance(ids, list) or not ids:
        return "input_ids should be a non-empty list of token ids."
    batch = isinstance(ids[0], list)
    return (ids if batch else [ids]), batch


def _rids(body: dict[str, Any], count: int, n: int) -> list[str] | str:
    rid = body.get("rid")
    if n > 1 or rid is None:
        return [uuid.uuid4().hex for _ in range(count * n)]
    if isinstance(rid, str):
        return [rid] if count == 1 else [f"{rid}_{i}" for i in range(count)]
    if not isinstance(rid, list) or len(rid) != count:
        return "The rid should be a string or a list of strings matching the batch size."
    return [str(r) for r in rid]


def parse_generate(body: dict[str, Any], engine: SimulatedEngine) -> GenerateJob | Response | str:
    """Checks in SGLang's order: schema, input, values, context length.

    A schema violation is a 400 response; a value error is returned as its message (SGLang
    answers it with a 400, or with an SSE error event when streaming).
    """
    config = engine.config
    raw_sampling = body.get("sampling_params") or {}
    parsed = _prompts(body, config.vocab_size)
    if isinstance(parsed, str):
        return parsed
    prompts, batch = parsed
    raw_list = raw_sampling if isinstance(raw_sampling, list) else [raw_sampling] * len(prompts)
    if len(raw_list) != len(prompts):
        return "The number of sampling_params must match the batch size."
    try:
        samplings = [msgspec.convert(raw, SamplingParamsBody) for raw in raw_list]
        prompt_ids = msgspec.convert(prompts, list[list[int]])
    except msgspec.ValidationError as err:
        return schema_error(f"Invalid request: {err}")
    for sampling, prompt in zip(samplings, prompt_ids, strict=True):
        message = (
            range_error(sampling)
            or length_error(len(prompt), sampling.max_new_tokens, config.context_length)
            or min_new_error(
                sampling.min_new_tokens,
                _max_new(sampling, len(prompt), config.context_length),
            )
        )
        if message:
            return message
    n = samplings[0].n
    if any(s.n != n for s in samplings):
        return "The n parameter must be the same for all samples in a batch."
    rids = _rids(body, len(prompt_ids), n)
    if isinstance(rids, str):
        return rids
    requests = [
        SimRequest(config, rid=rids[p * n + k], prompt=prompt, sampling=_spec(s, prompt, config),
                   sample_index=p * n + k)
        for p, (prompt, s) in enumerate(zip(prompt_ids, samplings, strict=True))
        for k in range(n)
    ]  # fmt: skip
    return GenerateJob(
        requests=requests,
        batch=batch or n > 1,
        stream=bool(body.get("stream", False)),
        return_logprob=bool(body.get("return_logprob", False)),
        interval=samplings[0].stream_interval or config.stream_interval,
    )


def _max_new(s: SamplingParamsBody, prompt_len: int, context: int) -> int:
    return context - prompt_len if s.max_new_tokens is None else s.max_new_tokens


def _spec(s: SamplingParamsBody, prompt: Sequence[int], config: Any) -> SamplingSpec:
    limit = config.context_length - len(prompt)
    return SamplingSpec(
        max_new_tokens=limit if s.max_new_tokens is None else s.max_new_tokens,
        min_new_tokens=s.min_new_tokens,
        ignore_eos=s.ignore_eos,
        stop_token_ids=frozenset(s.stop_token_ids or ()),
        sampling_seed=s.sampling_seed,
    )


def payload(
    engine: SimulatedEngine, req: SimRequest, job: GenerateJob, *, index: int | None
) -> dict[str, Any]:
    """One response object / stream event for ``req``, up to its ``reported`` cursor."""
    upto = req.reported if job.stream else len(req.output_ids)
    mode = engine.config.stream_output if job.stream else "cumulative"
    start = req.chunk_start if job.stream and mode == "incremental" else 0
    id_start = req.chunk_start if job.stream and mode in ("incremental", "mixed") else 0
    final = req.done and upto == len(req.output_ids)
    ids = req.output_ids[id_start:upto]
    meta: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": req.finish if final else None,
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": upto,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "num_retractions": 0,
        "weight_version": req.versions[upto - 1] if upto else engine.weight_version,
    }
    if job.return_logprob:
        entries = [[req.logprobs[i], req.output_ids[i], None] for i in range(start, upto)]
        meta.update(
            input_token_logprobs=[],
            output_token_logprobs=entries,
            output_token_logprobs_length=len(entries),
        )
    if final:
        meta["e2e_latency"] = anyio.current_time() - req.started_at if req.admitted else 0.0
        meta["response_sent_to_client_ts"] = time.time()
        if not engine.config.legacy:
            meta["weight_versions"] = req.version_spans()
        if not req.admitted:
            del meta["prompt_tokens"], meta["cached_tokens"]
    out: dict[str, Any] = {"output_ids": ids, "meta_info": meta}
    if engine.config.return_text:
        out["text"] = "".join(f"<{t}>" for t in req.output_ids[start:upto])
    if index is not None:
        out["index"] = index
    return out


async def generate(request: Request) -> Response:
    """``POST /generate`` (and ``PUT``)."""
    engine: SimulatedEngine = request.app.state.engine
    body = await read_json(request)
    if isinstance(body, Response):
        return body
    if not isinstance(body, dict):
        return bad_request("The request body must be a JSON object.")
    engine.stats.bodies.append(body)
    if engine.faults.take("fail_generate"):
        return fault_response(engine.faults.fail_status)
    job = parse_generate(body, engine)
    if isinstance(job, Response):
        return job
    if isinstance(job, str):
        return _rejection(engine, job, stream=bool(body.get("stream", False)))
    duplicate = engine.register(job.requests)
    if duplicate is not None:
        message = f"Duplicate request ID detected: {duplicate}"
        return _rejection(engine, message, stream=job.stream)
    if job.stream:
        return StreamingResponse(_events(engine, job), media_type="text/event-stream")
    return await _respond(request, engine, job)


def _rejection(engine: SimulatedEngine, message: str, *, stream: bool) -> Response:
    """A ValueError: ``400 {"error": {"message"}}``, or when streaming a 200 whose only event
    is the error (0.5.23 adds type/code/retryable) followed by ``[DONE]``."""
    if not stream:
        return value_error(message)
    error: dict[str, Any] = {"message": message}
    if not engine.config.legacy:
        error.update(type="invalid_request_error", code=400, retryable=False)
    event = encode_event(msgspec.json.encode({"error": error}).decode())
    return Response(event + encode_event(DONE), media_type="text/event-stream")


async def _respond(request: Request, engine: SimulatedEngine, job: GenerateJob) -> Response:
    reqs = job.requests
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_abort_on_disconnect, request, engine, reqs)
            async for _ in engine.run(reqs, interval=None):
                pass
            group.cancel_scope.cancel()
    finally:
        _end(engine, reqs)
    outs = [payload(engine, r, job, index=None) for r in reqs]
    return json_response(outs if job.batch else outs[0])


async def _abort_on_disconnect(
    request: Request, engine: SimulatedEngine, reqs: Sequence[SimRequest]
) -> None:
    """SGLang aborts a request whose client went away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for req in reqs:
        if not req.done:
            req.abort_message = "Aborted"
    engine.notify()


def _end(engine: SimulatedEngine, reqs: Sequence[SimRequest]) -> None:
    for req in reqs:
        if not req.done:
            req.abort_message = req.abort_message or "Aborted"
            req.end_aborted()
    engine.release(reqs)


async def _events(engine: SimulatedEngine, job: GenerateJob) -> AsyncIterator[bytes]:
    faults = engine.faults
    error_at = faults.error_after_tokens if faults.take("stream_errors") else None
    cut_at = faults.truncate_after_tokens if faults.take("truncations") else None
    garble = faults.take("garbles")
    sent = 0
    try:
        async for ready in engine.run(job.requests, interval=job.interval):
            for i in ready:
                req = job.requests[i]
                if error_at is not None and req.reported >= error_at:
                    error = {"message": "Simulated failure mid-stream.", "type": "internal_error",
                             "code": 500, "retryable": True}  # fmt: skip
                    yield encode_event(msgspec.json.encode({"error": error}).decode())
                    yield encode_event(DONE)
                    return
                if cut_at is not None and req.reported >= cut_at:
                    return
                data = msgspec.json.encode(
                    payload(engine, req, job, index=i if job.batch else None)
                ).decode()
                sent += 1
                yield encode_event(data[: len(data) // 2] if garble and sent == 2 else data)
        yield encode_event(DONE)
    finally:
        _end(engine, job.requests)
