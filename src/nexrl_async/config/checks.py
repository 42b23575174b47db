"""Cross-field checks of a converted recipe: rules no single field's type can express.

Each check yields ``(dotted_path, message)``; the loader turns the first into a ConfigError
naming the file that set that path.
"""

from __future__ import annotations

from collections.abc import Iterator

from nexrl_async.config.data import data_problems
from nexrl_async.config.inference import (
    AttachInference,
    LocalInference,
    NoInference,
    SGLangInference,
    VLLMInference,
)
from nexrl_async.config.model import BuiltModel, PretrainedModel
from nexrl_async.config.schema import RecipeConfig

Problem = tuple[str, str]


def cross_check(cfg: RecipeConfig) -> Iterator[Problem]:
    """Every cross-field problem of ``cfg``, in a stable order."""
    yield from _check_model(cfg)
    yield from data_problems("data", cfg.data)
    yield from _check_staleness(cfg)
    yield from _check_pool(cfg)
    yield from _check_algorithm(cfg)
    yield from _check_inference(cfg)
    yield from _check_vllm(cfg)
    yield from _check_shared(cfg)
    yield from _check_validation(cfg)
    yield from _check_rollout(cfg)


def vllm_cpu_reload(cfg: RecipeConfig) -> str | None:
    """How the recipe names a vLLM server whose weights are reloaded from disk on CPU (launched
    with ``device = "cpu"``, or attached: its device is unknown), else ``None``."""
    inf = cfg.inference
    if isinstance(inf, VLLMInference) and inf.device == "cpu":
        return 'inference.backend = "vllm" (device = "cpu")'
    if isinstance(inf, AttachInference) and inf.api == "vllm":
        return 'inference.api = "vllm"'
    return None


def _check_model(cfg: RecipeConfig) -> Iterator[Problem]:
    model = cfg.model
    if isinstance(model, BuiltModel):
        if cfg.tokenizer is None:
            yield (
                "tokenizer",
                'a built model needs a [tokenizer] section (kind = "chars" or a path)',
            )
        if model.hidden_size % model.num_attention_heads:
            yield (
                "model.num_attention_heads",
                f"model.num_attention_heads = {model.num_attention_heads}: "
                f"must divide model.hidden_size = {model.hidden_size}",
            )
        kv_heads = model.num_key_value_heads or model.num_attention_heads
        if model.num_attention_heads % kv_heads:
            yield (
                "model.num_key_value_heads",
                f"model.num_key_value_heads = {kv_heads}: "
                f"must divide model.num_attention_heads = {model.num_attention_heads}",
            )


def _check_staleness(cfg: RecipeConfig) -> Iterator[Problem]:
    st = cfg.staleness
    if st.mode == "sync" and st.max_staleness not in (None, 0):
        yield (
            "staleness.max_staleness",
            f"staleness.max_staleness = {st.max_staleness}: must be 0 when staleness.mode = "
            '"sync" (sync is on-policy)',
        )
    if st.mode == "batch-async" and st.max_staleness == 0:
        yield (
            "staleness.max_staleness",
            'staleness.max_staleness = 0: batch-async needs k >= 1 (use mode = "sync" for k = 0)',
        )
    if st.max_inflight_groups is not None and st.max_inflight_groups < cfg.pool.batch_groups:
        yield (
            "staleness.max_inflight_groups",
            f"staleness.max_inflight_groups = {st.max_inflight_groups}: must be >= "
            f"pool.batch_groups = {cfg.pool.batch_groups}, or no batch could ever fill",
        )


def _check_pool(cfg: RecipeConfig) -> Iterator[Problem]:
    pool = cfg.pool
    cap = pool.capacity_groups
    if cap is not None and cap < pool.batch_groups:
        yield (
            "pool.capacity_groups",
            f"pool.capacity_groups = {cap}: must be >= pool.batch_groups = {pool.batch_groups}",
        )
    size = cfg.rollout.group_size
    if size > 1 and pool.min_group_size > size:
        yield (
            "pool.min_group_size",
            f"pool.min_group_size = {pool.min_group_size}: more than rollout.group_size = "
            f"{size}, so any failed sample would discard its group (say "
            'pool.failed_samples = "drop_group" for that)',
        )
    for i, name in enumerate(pool.group_by):
        if not name or name in pool.group_by[:i]:
            problem = "is empty" if not name else "appears twice"
            yield "pool.group_by", f"pool.group_by[{i}] = {name!r} {problem}"


def _check_algorithm(cfg: RecipeConfig) -> Iterator[Problem]:
    algo = cfg.algorithm
    if algo.mode == "rl" and algo.estimator in ("grpo", "dr_grpo", "rloo"):
        if cfg.rollout.group_size < 2:
            yield (
                "rollout.group_size",
                f"rollout.group_size = {cfg.rollout.group_size}: algorithm.estimator = "
                f'"{algo.estimator}" needs groups of at least 2 samples',
            )
    if algo.minibatches > cfg.pool.batch_groups * cfg.rollout.group_size:
        yield (
            "algorithm.minibatches",
            f"algorithm.minibatches = {algo.minibatches}: more than the "
            f"{cfg.pool.batch_groups * cfg.rollout.group_size} samples of a batch",
        )
    if algo.mode != "rl" and (algo.dynamic_sampling or cfg.pool.filter_zero_variance):
        field = (
            "algorithm.dynamic_sampling" if algo.dynamic_sampling else "pool.filter_zero_variance"
        )
        yield (
            field,
            f'{field} = true: with algorithm.mode = "{algo.mode}" groups have no reward variance, '
            "so the zero-variance filter would drop every one of them",
        )
    if algo.mode == "dpo":
        yield from _check_dpo(cfg)
    if algo.kl.controller == "adaptive" and algo.kl.coef == 0:
        yield (
            "algorithm.kl.coef",
            "algorithm.kl.coef = 0.0: the adaptive controller needs a positive initial coefficient",
        )
    if algo.overlong.enabled and algo.overlong.buffer_len >= cfg.rollout.max_new_tokens:
        yield (
            "algorithm.overlong.buffer_len",
            f"algorithm.overlong.buffer_len = {algo.overlong.buffer_len}: must be < "
            f"rollout.max_new_tokens = {cfg.rollout.max_new_tokens}",
        )


def _check_dpo(cfg: RecipeConfig) -> Iterator[Problem]:
    """DPO trains one optimizer step per batch of pairs (docs/algorithms.md, *DPO*)."""
    algo = cfg.algorithm
    for field, value in (("minibatches", algo.minibatches), ("epochs", algo.epochs)):
        if value != 1:
            yield (
                f"algorithm.{field}",
                f'algorithm.{field} = {value}: algorithm.mode = "dpo" takes one optimizer step per '
                "batch of pairs; size the step with pool.batch_groups",
            )
    if cfg.pool.min_group_size < 2:
        yield (
            "pool.min_group_size",
            f"pool.min_group_size = {cfg.pool.min_group_size}: a DPO group is a pair; a pair "
            "with a failed side must be dropped, not trained",
        )
    if algo.dpo.label_smoothing > 0 and algo.dpo.loss != "sigmoid":
        yield (
            "algorithm.dpo.label_smoothing",
            f"algorithm.dpo.label_smoothing = {algo.dpo.label_smoothing}: only the sigmoid loss "
            f'smooths labels; algorithm.dpo.loss = "{algo.dpo.loss}"',
        )


def _check_inference(cfg: RecipeConfig) -> Iterator[Problem]:
    inf = cfg.inference
    if isinstance(inf, AttachInference) and not inf.urls:
        yield "inference.urls", "inference.urls = []: attach needs at least one server URL"
    if isinstance(inf, NoInference) and cfg.algorithm.mode == "rl":
        yield (
            "inference.backend",
            'inference.backend = "none" with algorithm.mode = "rl": RL generates its samples; '
            'only algorithm.mode = "sft" or "dpo" can run without servers',
        )
    if isinstance(inf, NoInference) and cfg.rollout.worker is None:
        yield (
            "inference.backend",
            'inference.backend = "none": the default rollout worker generates; name one that '
            'does not, e.g. rollout.worker = "nexrl_async.rollout.sft_worker:SFTWorker"',
        )
    if isinstance(inf, SGLangInference) and inf.model_path is None:
        if not isinstance(cfg.model, PretrainedModel):
            yield (
                "inference.model_path",
                "inference.model_path is unset: SGLang serves a local HF folder; set it or use "
                'model.kind = "pretrained"',
            )


def _check_shared(cfg: RecipeConfig) -> Iterator[Problem]:
    """Shared-memory publication reaches only servers the fleet launches on this host."""
    if cfg.weights.transport == "shared" and not isinstance(cfg.inference, LocalInference):
        yield (
            "weights.transport",
            'weights.transport = "shared" needs inference.backend = "local": only our local '
            'servers (launched on this host) load weights from shared memory; use "disk", '
            '"distributed" (SGLang) or "auto"',
        )


def _check_vllm(cfg: RecipeConfig) -> Iterator[Problem]:
    """vLLM takes weights from disk only; on CPU its reload leaves a tied LM head stale."""
    inf = cfg.inference
    if isinstance(inf, VLLMInference | AttachInference) and cfg.weights.transport == "distributed":
        if isinstance(inf, VLLMInference) or inf.api == "vllm":
            yield (
                "weights.transport",
                'weights.transport = "distributed": vLLM 0.32 has no weight-transfer engine that '
                'runs here (docs/vllm.md §6.2); use "disk" (or "auto")',
            )
    served = vllm_cpu_reload(cfg)
    if served and isinstance(cfg.model, BuiltModel) and cfg.model.tie_word_embeddings:
        yield (
            "model.tie_word_embeddings",
            f"model.tie_word_embeddings = true with {served}: a disk reload leaves the tied LM "
            "head on the old weights (docs/vllm.md §6.1); set it to false",
        )


def _check_validation(cfg: RecipeConfig) -> Iterator[Problem]:
    val = cfg.validation
    if val.data is not None:
        yield from data_problems("validation.data", val.data)
    if val.data is None and val.every_steps > 0:
        yield (
            "validation.every_steps",
            f"validation.every_steps = {val.every_steps}: needs [validation.data]",
        )


def _check_rollout(cfg: RecipeConfig) -> Iterator[Problem]:
    rollout = cfg.rollout
    if rollout.check_transcript and not rollout.apply_chat_template:
        yield (
            "rollout.check_transcript",
            "rollout.check_transcript = true compares samples with the chat template's "
            "rendering: it needs rollout.apply_chat_template = true",
        )
