"""The inference benchmark's plot and summary table (``benchmarks/inference.py`` measures)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from harness import save_figure, table, use_agg_backend


def plot(results: dict[str, Any], out_dir: Path, name: str) -> Path:
    """Left: requests/s per sender (median bar, trials as dots). Right: local-server tokens/s
    per concurrency level against the target, and tokens per server CPU-second."""
    use_agg_backend()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.4))
    client, local, demo = results.get("client"), results.get("local"), results.get("demo")
    for ax, part in zip(axes, (client, local, demo), strict=True):
        if not part:
            ax.axis("off")
            ax.text(0.5, 0.5, "not run (--part)", ha="center", va="center")
    if client:
        _plot_client(axes[0], client)
    if local:
        _plot_local(axes[1], local)
    if demo:
        _plot_demo(axes[2], demo)
    fig.suptitle("Inference benchmarks")
    return save_figure(fig, out_dir, name)


def _plot_client(ax: Any, client: dict[str, Any]) -> None:
    for x, kind in enumerate(("client", "httpx")):
        rates = [t["requests_per_s"] for t in client["trials"] if t["kind"] == kind]
        ax.bar(x, statistics.median(rates), color=("tab:blue", "tab:gray")[x], alpha=0.8)
        ax.plot([x] * len(rates), rates, "k.", label="trials" if x == 0 else None)
    ax.set_xticks([0, 1], ["SGLangClient", "bare httpx"])
    ax.set_ylabel("requests / s")
    ax.legend(loc="lower right")
    concurrency = client["settings"]["concurrency"]
    ax.set_title(
        f"(a) client / httpx = {client['ratio']:.2f} (target >= {client['target']}), "
        f"concurrency {concurrency}",
        fontsize=10,
    )


def _plot_local(ax: Any, local: dict[str, Any]) -> None:
    levels = [str(row["concurrency"]) for row in local["levels"]]
    rates = [row["tokens_per_s"] for row in local["levels"]]
    ax.bar(levels, rates, color="tab:green", alpha=0.8, label="tokens / s (median of rounds)")
    target = local["target"] * rates[0]
    ax.axhline(target, color="tab:red", ls="--", label=f"{local['target']:g} x rate at {levels[0]}")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens / s")
    cpu = ax.twinx()
    per_cpu = [row["tokens_per_server_cpu_s"] for row in local["levels"]]
    cpu.plot(levels, per_cpu, "o-", color="tab:purple", label="tokens / server CPU-s")
    cpu.set_ylabel("tokens per server CPU-second")
    cpu.set_ylim(0, max(per_cpu) * 1.15)
    handles = ax.get_legend_handles_labels()[0] + cpu.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    ax.set_title(f"(b) local server: x{local['speedup']:.1f} ({local['speedup_of']})", fontsize=10)


def _plot_demo(ax: Any, demo: dict[str, Any]) -> None:
    names = list(demo["medians"])
    loop = [demo["medians"][n]["loop_cpu_ms_per_sample"] for n in names]
    ax.bar(range(len(names)), loop, color="tab:orange", alpha=0.8, label="loop CPU ms / sample")
    ax.axhline(demo["target_loop_ms"], color="tab:red", ls="--", label="target")
    ax.set_xticks(range(len(names)), [Path(n).parent.name or n for n in names], fontsize=8)
    ax.set_ylabel("event-loop CPU per sample (ms)")
    steps = ax.twinx()
    steps.plot(range(len(names)), [demo["medians"][n]["step_s_median"] for n in names], "o",
               color="tab:blue", label="s / step")  # fmt: skip
    steps.set_ylabel("median s / step")
    handles = ax.get_legend_handles_labels()[0] + steps.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(f"(c) demo, {demo['settings']['steps']} steps", fontsize=10)


def print_summary(results: dict[str, Any]) -> None:
    if client := results.get("client"):
        rows = [
            ["SGLangClient", client["client_requests_per_s"], client["client_cpu_us_per_request"],
             client["client_requests_per_cpu_s"]],
            ["bare httpx", client["httpx_requests_per_s"], client["httpx_cpu_us_per_request"],
             client["httpx_requests_per_cpu_s"]],
        ]  # fmt: skip
        print(table(["(a) sender", "req/s", "client CPU us/req", "req/CPU-s"], rows))
        verdict = "PASS" if client["passed"] else "FAIL"
        print(f"ratio {client['ratio']:.3f} (target >= {client['target']}), "
              f"{client['client_requests_per_cpu_s']:.0f} req/CPU-s "
              f"(target >= {client['target_requests_per_cpu_s']:.0f}): {verdict}\n")  # fmt: skip
    if demo := results.get("demo"):
        keys = ("step_s_median", "loop_cpu_ms_per_sample", "server_cpu_ms_per_sample")
        rows = [[src, *(m[k] for k in keys)] for src, m in demo["medians"].items()]
        print(table(["(c) source", "s/step", "loop CPU ms/sample", "server CPU ms/sample"], rows))
        verdict = "PASS" if demo["passed"] else "FAIL"
        print(f"target <= {demo['target_loop_ms']} ms/sample: {verdict}\n")
    if local := results.get("local"):
        rows = [
            [r["concurrency"], r["tokens_per_s"], r["mean_latency_s"], r["mean_batch"],
             r["wall_ms_per_step"], r["tokens_per_server_cpu_s"]]
            for r in local["levels"]
        ]  # fmt: skip
        headers = ["(b) concurrency", "tokens/s", "latency s", "batch", "ms/step",
                   "tokens/server-CPU-s"]  # fmt: skip
        print(table(headers, rows))
        verdict = "PASS" if local["passed"] else "FAIL"
        print(f"speedup {local['speedup']:.2f} (target >= {local['target']}): {verdict}")
