"""``python -m nexrl_async.testing.simulated`` as a subprocess, driven by the client."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import anyio
import httpx

from nexrl_async.inference.client.sglang import RetryPolicy, SamplingParams, SGLangClient


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_the_module_runs_as_a_server_process() -> None:
    port = _free_port()
    command = [
        sys.executable, "-m", "nexrl_async.testing.simulated", "--port", str(port),
        "--token-latency-s", "0.001", "--incremental-streaming-output", "--api-key", "k",
        "--weight-version", "0",
    ]  # fmt: skip
    process = await anyio.open_process(command, stdout=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient() as http:
            client = SGLangClient(
                f"http://127.0.0.1:{port}",
                http=http,
                api_key="k",
                backoff=RetryPolicy(base_delay_s=0.01),
            )
            with anyio.fail_after(30):
                while not await client.health(timeout_s=1):
                    assert process.returncode is None, "the simulated server exited"
                    await anyio.sleep(0.1)
            sampling = SamplingParams(max_new_tokens=16, ignore_eos=True)
            streamed = await client.generate([1, 2, 3], sampling, stream=True)
            plain = await client.generate([1, 2, 3], sampling)
            assert streamed.output_ids == plain.output_ids
            assert len(plain.output_ids) == 16
            assert plain.weight_version_int == 0
            faults = await http.post(
                f"http://127.0.0.1:{port}/_sim/faults", json={"fail_generate": 2}
            )
            faults.raise_for_status()
            assert (await client.generate([4], sampling)).rid.endswith("-retry2")
            stats = (await http.get(f"http://127.0.0.1:{port}/_sim/stats")).json()
            assert stats["generate_requests"] == 3
    finally:
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            await process.wait()
        await process.aclose()
    assert process.returncode is not None
