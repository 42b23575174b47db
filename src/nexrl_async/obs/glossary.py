"""Every metric a run logs, with its unit and meaning: the source of docs/metrics.md.

A name may hold ``<placeholders>`` (``rollout/failed/<reason>``) that stand for one path
segment. Tests keep this list honest: every metric a real run writes to ``metrics.jsonl`` and
every metric name spelled out in the source must match an entry (``tests/unit/obs``,
``tests/integration/engine``). Regenerate the page after adding an entry::

    python -m nexrl_async.obs.glossary docs/metrics.md
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nexrl_async.config.reference import generated_doc_main

COMMAND = "python -m nexrl_async.obs.glossary docs/metrics.md"
"""The command that regenerates docs/metrics.md (run from the repository root)."""


@dataclass(frozen=True)
class MetricDoc:
    name: str
    unit: str
    meaning: str


STEP = "per step"
TOTAL = "since start"
"""Counters that only grow during a process (a resumed run counts from its restart)."""

GLOSSARY: tuple[tuple[str, str, tuple[MetricDoc, ...]], ...] = (
    (
        "rollout",
        "The samples of the trained batch, and rollout failures.",
        (
            MetricDoc("rollout/reward_mean", "reward", "Mean evaluator reward of the batch."),
            MetricDoc("rollout/reward_max", "reward", "Highest evaluator reward of the batch."),
            MetricDoc(
                "rollout/<metric>_mean",
                "the metric's",
                "Mean of an evaluator metric (`EvalResult.metrics`, e.g. the demo's `exact`) "
                "over the batch's samples that report it.",
            ),
            MetricDoc(
                "rollout/response_len_mean",
                "tokens",
                "Model-generated (loss-mask 1) tokens per sample, all turns together.",
            ),
            MetricDoc("rollout/samples", "samples", "Samples in the batch."),
            MetricDoc(
                "rollout/failed",
                "samples",
                "Samples that failed since the previous step (any reason).",
            ),
            MetricDoc(
                "rollout/failed/<reason>",
                "samples",
                f"Failed samples by `FailureReason` ({TOTAL}): `bad_item`, `format_error`, "
                "`prompt_rejected`, `engine_unavailable`, `generation_error`, `tool_error`, "
                "`evaluator_error`, `invalid_reward`, `timeout`, `internal`.",
            ),
        ),
    ),
    (
        "pipeline",
        "The staleness gate (leases: permissions to generate one group) and the flow.",
        (
            MetricDoc(
                "pipeline/staleness_mean",
                "steps",
                "Mean over the batch's groups of `step - head_version`, the oldest weight "
                "version behind any of a group's tokens.",
            ),
            MetricDoc("pipeline/staleness_max", "steps", "Largest group staleness of the batch."),
            MetricDoc(
                "pipeline/batch_wait_s", "s", "Time the trainer waited for this step's batch."
            ),
            MetricDoc(
                "pipeline/gate_wait_s",
                "s",
                "Time rollout workers spent waiting for a lease since the previous step, summed "
                "over workers (the staleness bound's backpressure).",
            ),
            MetricDoc("pipeline/policy_version", "version", "Policy version the fleet serves."),
            MetricDoc(
                "pipeline/leases_outstanding",
                "leases",
                "Leases issued and neither trained nor released (groups in flight or pooled).",
            ),
            MetricDoc("pipeline/leases_issued", "leases", f"Leases issued ({TOTAL})."),
            MetricDoc(
                "pipeline/leases_redeemed", "leases", f"Leases whose group was trained ({TOTAL})."
            ),
            MetricDoc(
                "pipeline/leases_released",
                "leases",
                f"Leases given back: failed, filtered or cancelled groups ({TOTAL}).",
            ),
            MetricDoc(
                "pipeline/leases_dropped",
                "leases",
                f'Leases of groups dropped as overdue (`on_overdue = "drop"`, {TOTAL}).',
            ),
            MetricDoc(
                "pipeline/leases_requeued",
                "leases",
                f'Overdue leases re-issued (`on_overdue = "requeue"`, {TOTAL}).',
            ),
            MetricDoc(
                "pipeline/lease_refusals",
                "refusals",
                f"Lease requests the admission rule refused ({TOTAL}).",
            ),
            MetricDoc(
                "pipeline/abandoned_items",
                "items",
                f"Items skipped after failing `data.max_replays` times ({TOTAL}).",
            ),
        ),
    ),
    (
        "pool",
        "The trajectory pool between rollouts and the trainer.",
        (
            MetricDoc("pool/size", "groups", "Groups left in the pool after the batch was taken."),
            MetricDoc(
                "pool/failed_groups",
                "groups",
                "Groups not kept because of failed samples (fewer than `pool.min_group_size` "
                f'left, or any under `pool.failed_samples = "drop_group"`; their items '
                f"replay, {TOTAL}).",
            ),
            MetricDoc(
                "pool/partial_groups",
                "groups",
                f"Groups kept without some failed samples, or with them zeroed ({TOTAL}).",
            ),
            MetricDoc(
                "pool/dropped_samples",
                "samples",
                f"Failed samples dropped from groups that were kept ({TOTAL}).",
            ),
            MetricDoc(
                "pool/zeroed_samples",
                "samples",
                f'Failed samples kept with reward 0 (`pool.failed_samples = "zero_reward"`, '
                f"{TOTAL}).",
            ),
            MetricDoc(
                "pool/filtered_zero_variance",
                "groups",
                "Groups dropped because all rewards were equal (`pool.filter_zero_variance`, "
                f"`algorithm.dynamic_sampling`; {TOTAL}).",
            ),
            MetricDoc("pool/dropped_overdue", "groups", f"Overdue groups dropped ({TOTAL})."),
            MetricDoc("pool/requeued", "groups", f"Overdue groups requeued ({TOTAL})."),
            MetricDoc(
                "pool/waits",
                "steps",
                f"Steps that waited for stragglers to keep the staleness bound ({TOTAL}).",
            ),
            MetricDoc(
                "pool/over_capacity",
                "groups",
                f"Groups admitted to a full pool because the next step waits for them ({TOTAL}).",
            ),
        ),
    ),
    (
        "train",
        "The training step. Losses average over the step's optimizer steps; token statistics "
        "are over loss-mask tokens; `entropy`, `kl` and `logprob_mismatch` are measured with "
        "the weights before the step. Formulas: docs/algorithms.md.",
        (
            MetricDoc("train/loss", "loss", "The optimised loss (every term together)."),
            MetricDoc("train/pg_loss", "loss", "Policy-gradient (clipped surrogate) term."),
            MetricDoc("train/kl_loss", "nats", 'KL term (`algorithm.kl.placement = "loss"`).'),
            MetricDoc(
                "train/entropy_bonus", "nats", "Entropy term (`algorithm.entropy_coef > 0`)."
            ),
            MetricDoc("train/nll", "nats/token", "SFT: negative log-likelihood per token."),
            MetricDoc("train/entropy", "nats/token", "Policy entropy per trained token."),
            MetricDoc("train/kl", "nats/token", "KL estimate to the reference model."),
            MetricDoc("train/kl_coef", "coefficient", "KL coefficient (adaptive or fixed)."),
            MetricDoc(
                "train/logprob_mismatch",
                "nats/token",
                "Mean |trainer − server| log-prob of the generated tokens: 0 means the servers "
                "sample exactly the trained policy.",
            ),
            MetricDoc("train/approx_kl", "nats/token", "KL of the update (new vs old policy)."),
            MetricDoc("train/ratio_mean", "ratio", "Mean importance ratio new/old policy."),
            MetricDoc("train/ratio_max", "ratio", "Largest importance ratio."),
            MetricDoc("train/clip_frac_high", "fraction", "Tokens clipped above 1 + `clip_high`."),
            MetricDoc("train/clip_frac_low", "fraction", "Tokens clipped below 1 − `clip_low`."),
            MetricDoc(
                "train/dual_clip_frac", "fraction", "Tokens hitting the dual clip (`dual_clip_c`)."
            ),
            MetricDoc("train/tis_weight_mean", "weight", "Mean truncated importance weight (TIS)."),
            MetricDoc(
                "train/reward_mean",
                "reward",
                "Mean reward the trainer used (evaluator reward plus shaping such as the "
                "overlong penalty).",
            ),
            MetricDoc("train/advantage_mean", "advantage", "Mean advantage per trained token."),
            MetricDoc("train/advantage_std", "advantage", "Std of the advantages."),
            MetricDoc(
                "train/zero_variance_frac",
                "fraction",
                "Groups whose rewards are all equal (no learning signal).",
            ),
            MetricDoc("train/response_len_mean", "tokens", "Trained tokens per row."),
            MetricDoc("train/tokens", "tokens", "All tokens of the batch (prompts included)."),
            MetricDoc("train/loss_tokens", "tokens", "Trained (loss-mask 1) tokens."),
            MetricDoc("train/grad_norm", "norm", "Gradient norm before clipping (mean)."),
            MetricDoc("train/optimizer_steps", "steps", "Optimizer steps taken this step."),
            MetricDoc(
                "train/skipped_steps", "steps", "Optimizer steps skipped: non-finite gradient."
            ),
            MetricDoc("train/lr", "learning rate", "Learning rate after the step."),
            MetricDoc("train/step_s", "s", "Time of the train step (all ranks)."),
            MetricDoc("train/micro_batches", "micro-batches", "Forward/backward passes per epoch."),
            MetricDoc(
                "train/padding_frac", "fraction", "Share of micro-batch slots that are padding."
            ),
            MetricDoc(
                "train/user/<name>",
                "yours",
                "A metric returned by `algorithm.prepare_batch` or a custom `algorithm.loss`.",
            ),
            MetricDoc(
                "train/reward_chosen",
                "nats",
                "DPO: mean implicit reward of the chosen completions, "
                "`beta · (log π − log π_ref)`.",
            ),
            MetricDoc("train/reward_rejected", "nats", "DPO: the same for the rejected ones."),
            MetricDoc(
                "train/reward_margin", "nats", "DPO: mean chosen minus rejected implicit reward."
            ),
            MetricDoc(
                "train/preference_accuracy",
                "fraction",
                "DPO: pairs whose chosen implicit reward is strictly larger (0 at step 0).",
            ),
            MetricDoc("train/pairs", "pairs", "DPO: preference pairs in the batch."),
            MetricDoc("train/logp_chosen", "nats", "DPO: mean log-prob of the chosen completions."),
            MetricDoc(
                "train/logp_rejected", "nats", "DPO: mean log-prob of the rejected completions."
            ),
        ),
    ),
    (
        "data",
        "Per named data source (each source of a mixture, docs/data.md), `<source>` its name.",
        (
            MetricDoc("data/<source>/groups", "groups", "Its groups in the batch (absent if 0)."),
            MetricDoc("data/<source>/samples", "samples", "Their samples."),
            MetricDoc("data/<source>/reward_mean", "reward", "Mean reward of those samples."),
            MetricDoc("data/<source>/drawn", "items", "New items it handed out so far (resumed)."),
            MetricDoc("data/<source>/epoch", "epochs", "The epoch it is in."),
            MetricDoc("data/draws", "items", "Draws of the mixture so far (resumed)."),
        ),
    ),
    (
        "val",
        "Validation (`[validation]`), logged at the step it ran after.",
        (
            MetricDoc(
                "val/reward_mean",
                "reward",
                "Mean reward over the validation samples (failed samples per "
                "`validation.failed_samples`).",
            ),
            MetricDoc(
                "val/<metric>_mean", "the metric's", "Mean of an evaluator metric in validation."
            ),
            MetricDoc("val/samples", "samples", "Validation samples run."),
            MetricDoc("val/failed", "samples", "Validation samples that failed."),
            MetricDoc(
                "val/loss",
                "nats/token",
                "SFT: held-out NLL of the reference answers. DPO: the pair loss of the held-out "
                "pairs (a loss, not per token).",
            ),
            MetricDoc("val/ppl", "perplexity", "SFT: `exp(val/loss)`."),
            MetricDoc("val/tokens", "tokens", "SFT: tokens scored by `val/loss`."),
            MetricDoc(
                "val/preference_accuracy",
                "fraction",
                "DPO: held-out pairs whose chosen implicit reward is strictly larger.",
            ),
            MetricDoc("val/reward_margin", "nats", "DPO: mean implicit reward margin, held out."),
            MetricDoc("val/reward_chosen", "nats", "DPO: mean chosen implicit reward, held out."),
            MetricDoc(
                "val/reward_rejected", "nats", "DPO: mean rejected implicit reward, held out."
            ),
            MetricDoc("val/pairs", "pairs", "DPO: held-out pairs scored."),
            MetricDoc("val/logp_chosen", "nats", "DPO: mean log-prob of the chosen, held out."),
            MetricDoc("val/logp_rejected", "nats", "DPO: mean log-prob of the rejected, held out."),
            MetricDoc("val/user/<name>", "yours", "DPO: a custom `algorithm.loss` metric."),
            MetricDoc("val/<source>/reward_mean", "reward", "`val/reward_mean`, one source."),
            MetricDoc("val/<source>/<metric>_mean", "the metric's", "An evaluator metric, one."),
            MetricDoc("val/<source>/samples", "samples", "Validation samples of one source."),
            MetricDoc("val/<source>/failed", "samples", "Those that failed."),
        ),
    ),
    (
        "weights",
        "Publishing the new weights to the inference servers.",
        (
            MetricDoc("weights/publish_s", "s", "Whole publication, pause to resume."),
            MetricDoc("weights/pause_s", "s", "Time the servers were paused."),
            MetricDoc("weights/hold_s", "s", "Time routing was held before the transfer."),
            MetricDoc("weights/bytes", "bytes", "Bytes transferred."),
            MetricDoc("weights/skipped", "servers", "Servers skipped because they were down."),
        ),
    ),
    (
        "timing and throughput",
        "",
        (
            MetricDoc(
                "timing/step_s", "s", "Wall time of the step: batch wait, train, publish, more."
            ),
            MetricDoc(
                "throughput/tokens_per_s",
                "tokens/s",
                "Tokens generated by the fleet during the step, over the step's wall time.",
            ),
        ),
    ),
)

NOT_LOGGED = frozenset({"rollout/generated_tokens"})
"""Names in the source that never reach the sinks (turned into ``throughput/tokens_per_s``)."""


def entries() -> list[MetricDoc]:
    return [doc for _, _, docs in GLOSSARY for doc in docs]


def _pattern(name: str) -> re.Pattern[str]:
    parts = re.split(r"(<[a-z_]+>)", name)
    body = "".join("[^/]+" if p.startswith("<") else re.escape(p) for p in parts)
    return re.compile(body)


def describe(name: str) -> MetricDoc | None:
    """The glossary entry ``name`` matches (exact names before placeholders), or ``None``."""
    docs = entries()
    for doc in docs:
        if doc.name == name:
            return doc
    for doc in docs:
        if "<" in doc.name and _pattern(doc.name).fullmatch(name):
            return doc
    return None


def render() -> str:
    """docs/metrics.md."""
    lines = [
        "# Metrics",
        "",
        f"<!-- Generated from src/nexrl_async/obs/glossary.py by `{COMMAND}`. -->",
        "",
        "Every step appends one line to `<run>/metrics.jsonl` (`step`, `time`, then the metrics",
        "below) and sends the same values to TensorBoard and W&B when they are on. A metric",
        "is present only where it applies (`val/*` at validation steps, `train/kl` with a KL",
        "term, ...). Counters marked *since start* only grow within one process. Non-finite",
        "values are written as `null`. `<name>` stands for one path segment.",
        "",
    ]
    for area, intro, docs in GLOSSARY:
        lines += [f"## {area}", ""]
        if intro:
            lines += [intro.replace("docs/algorithms.md", "[algorithms.md](algorithms.md)"), ""]
        lines += ["| metric | unit | meaning |", "|---|---|---|"]
        lines += [f"| `{d.name}` | {d.unit} | {d.meaning} |" for d in docs]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None, write: Callable[[str], Any] = sys.stdout.write) -> int:
    """``glossary [--check] [PATH]``: write (or compare) the metrics page."""
    return generated_doc_main(
        argv, prog="nexrl_async.obs.glossary", render=render, command=COMMAND, write=write
    )


if __name__ == "__main__":
    sys.exit(main())
