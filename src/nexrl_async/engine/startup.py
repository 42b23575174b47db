"""The run's pre-flight: everything ``run`` would reject at its start, checked before it starts.

``nexrl-async check``, ``nexrl-async run`` (before it opens the run folder) and the Python API
call the same :func:`preflight_run`, so a recipe ``check`` accepts does not fail at start, and
one it refuses is refused by ``run`` with the same one line and exit code 2:

1. the recipe's files: every path exists, every ``file.py:Name`` imports (``config.preflight``);
2. optional backends the recipe asks for are installed: TensorBoard, W&B, flash-attention,
   bubblewrap for the sandboxed python tool, SGLang / vLLM in their interpreter; a ``cuda``
   device (``trainer.device``, the local server's) exists;
3. the tokenizer loads and the model's architecture builds (on the meta device: no weights are
   read or allocated; a pretrained folder must hold weight files), with its ``[model.lora]``
   adapters (peft installed, ``target_modules`` matching linear layers);
4. user objects have the right shape: the evaluator (a class is instantiated, as the run does)
   has ``evaluate(item, trajectory)``, the worker is a worker class (one that never generates
   when ``inference.backend = "none"``) and is built with them and the tokenizer as the run
   builds it (a custom constructor runs; nothing generates), tools are tools,
   ``prepare_batch`` takes the batch, ``algorithm.loss`` its inputs;
5. the data (and the validation data) reads, and some row has every required field (and the
   prompt field, for the default worker; for the training data, the ``pool.group_by`` fields).

Every failure is a :class:`ConfigError` naming the recipe file and the dotted path.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel

from nexrl_async.config.data import DataConfig, sources_of
from nexrl_async.config.inference import LocalInference, SGLangInference, VLLMInference
from nexrl_async.config.loader import LoadedRecipe
from nexrl_async.config.model import BuiltModel, PretrainedModel
from nexrl_async.config.preflight import preflight
from nexrl_async.config.schema import RecipeConfig
from nexrl_async.core.errors import ConfigError, DataError, UserCodeError
from nexrl_async.core.protocols import GroupWorker
from nexrl_async.core.usercode import load_object
from nexrl_async.data import load_rows, missing_fields
from nexrl_async.engine.parts import check_serverless
from nexrl_async.obs.metrics import require_sink_backends
from nexrl_async.rollout.generation import TurnGenerator
from nexrl_async.rollout.loading import load_evaluator, load_tools, load_worker_class
from nexrl_async.rollout.rendering import Tokenizer
from nexrl_async.rollout.sandbox import configure_tool
from nexrl_async.rollout.scoring import SourceEvaluators
from nexrl_async.rollout.tools import Tool
from nexrl_async.rollout.worker import RolloutWorker
from nexrl_async.train.hook import PrepareBatchHook
from nexrl_async.train.lora import apply_lora
from nexrl_async.train.model_loading import load_policy, load_tokenizer, resolve_device

_PROBE_TIMEOUT_S = 60.0


def preflight_run(recipe: LoadedRecipe) -> None:
    """Raise :class:`ConfigError` for the first thing the run would reject at its start."""
    preflight(recipe)
    with _at(recipe, None):
        _backends(recipe)
    with _at(recipe, "model"):
        tokenizer = _model(recipe)
    _user_objects(recipe, tokenizer)
    _data(recipe, "data", recipe.config.data)
    if recipe.config.validation.data is not None:
        _data(recipe, "validation.data", recipe.config.validation.data)


@contextmanager
def _at(recipe: LoadedRecipe, dotted: str | None) -> Iterator[None]:
    """Errors inside become ConfigErrors of the recipe file at ``dotted`` (or their own path)."""
    file = str(recipe.path)
    try:
        yield
    except ConfigError as err:
        if err.file is not None:
            raise
        message = str(err)
        if dotted and err.path is None and not message.startswith(dotted):
            message = f"{dotted}: {message}"
        raise ConfigError(message, file=file, path=err.path or dotted) from err
    except (UserCodeError, DataError) as err:
        where = f"{dotted}: " if dotted else ""
        raise ConfigError(f"{where}{err}", file=file, path=dotted) from err


def _backends(recipe: LoadedRecipe) -> None:
    cfg = recipe.config
    require_sink_backends(cfg.logging)
    configure_tool(cfg.rollout)
    if cfg.model.attn_implementation == "flash_attention_2" and not _importable("flash_attn"):
        raise ConfigError(
            'model.attn_implementation = "flash_attention_2" but flash-attn is not installed: '
            "pip install 'nexrl-async[gpu]' (or use \"sdpa\")",
            path="model.attn_implementation",
        )
    resolve_device(cfg.trainer.device)
    inf = cfg.inference
    if isinstance(inf, LocalInference) and inf.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "inference.device = 'cuda' but CUDA is not available", path="inference.device"
        )
    if isinstance(inf, SGLangInference) and inf.command is None:
        _probe(inf.python, "sglang", 'inference.backend = "sglang"')
    if isinstance(inf, VLLMInference):
        python = inf.python or os.environ.get("NEXRL_VLLM_PYTHON") or "python"
        _probe(python, "vllm", 'inference.backend = "vllm"')


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _probe(python: str, module: str, what: str) -> None:
    """``python`` runs and finds ``module`` (no import: a find_spec in a fresh interpreter)."""
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        done = subprocess.run(
            [python, "-c", code], capture_output=True, timeout=_PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(
            f"{what}: cannot run inference.python = {python!r} ({err})", path="inference.python"
        ) from err
    if done.returncode != 0:
        raise ConfigError(
            f"{what}: {module} is not installed for inference.python = {python!r}; point "
            f"inference.python at the interpreter of {module}'s environment",
            path="inference.python",
        )


def _user_objects(recipe: LoadedRecipe, tokenizer: Tokenizer) -> None:
    cfg, base = recipe.config, recipe.base_dir
    with _at(recipe, "rollout.evaluator"):
        evaluator = load_evaluator(cfg.rollout.evaluator, base)
        _takes(getattr(evaluator, "evaluate", evaluator), 2, cfg.rollout.evaluator)
    by_source: dict[str, Any] = {}
    for dotted, data in (("data", cfg.data), ("validation.data", cfg.validation.data)):
        for at, source in sources_of(dotted, data) if data is not None else ():
            if source.evaluator is not None:
                with _at(recipe, f"{at}.evaluator"):
                    per_source = load_evaluator(source.evaluator, base)
                    _takes(getattr(per_source, "evaluate", per_source), 2, source.evaluator)
                if dotted == "data" and source.name is not None:
                    by_source[source.name] = per_source
    with _at(recipe, "rollout.tools"):
        tools = load_tools(cfg.rollout.tools, base)
    with _at(recipe, "rollout.worker"):
        worker = load_worker_class(cfg.rollout.worker, base)
        check_serverless(cfg, cast(GroupWorker, worker))  # ``generates`` is a class attribute
    with _at(recipe, "rollout.worker" if cfg.rollout.worker else "rollout"):
        scorer = SourceEvaluators(evaluator, by_source) if by_source else evaluator
        _build_worker(cfg, worker, scorer, tools, tokenizer)
    loss = cfg.algorithm.loss
    if isinstance(loss, str):  # the Python API may set a callable (docs/algorithms.md)
        with _at(recipe, "algorithm.loss"):
            fn = load_object(loss, base)
            if not callable(fn):
                raise UserCodeError(f"algorithm.loss = {loss!r} is not callable")
            _takes(fn, 1, loss)
    if cfg.algorithm.prepare_batch is not None:
        with _at(recipe, "algorithm.prepare_batch"):
            PrepareBatchHook.load(cfg.algorithm.prepare_batch, base)
            _takes(load_object(cfg.algorithm.prepare_batch, base), 1, cfg.algorithm.prepare_batch)


class _NoGeneration:
    """The pre-flight's generator: a worker is built, never run (any call is a bug)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the pre-flight does not generate ({name})")


def _build_worker(
    cfg: RecipeConfig, cls: type[RolloutWorker], evaluator: Any, tools: list[Tool], tok: Tokenizer
) -> None:
    """Construct the worker as the run does (``rollout.loading.load_worker``), with the user
    objects already loaded: a custom worker's constructor, the renderer and its tokenizer."""
    try:
        generator = cast(TurnGenerator, _NoGeneration())
        cls(
            cfg.rollout, tokenizer=tok, generator=generator, evaluator=evaluator, tools=tools,
            required=list(cfg.data.required),
        )  # fmt: skip
    except UserCodeError:
        raise
    except Exception as err:
        raise UserCodeError(
            f"{cfg.rollout.worker or 'RolloutWorker'!r}: building the worker raised "
            f"{type(err).__name__}: {err}"
        ) from err


def _takes(fn: Callable[..., Any], count: int, ref: str) -> None:
    """``fn`` accepts ``count`` positional arguments (when its signature can be read)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins and some C callables have none: the call will tell
    try:
        signature.bind(*range(count))
    except TypeError as err:
        raise UserCodeError(
            f"{ref!r}: {getattr(fn, '__qualname__', fn)!s}{signature} cannot be called with "
            f"{count} positional argument{'s' if count > 1 else ''} ({err})"
        ) from None


def _model(recipe: LoadedRecipe) -> Tokenizer:
    """The tokenizer loads; the model builds on the meta device (no weights read)."""
    cfg = recipe.config
    model = cfg.model
    meta = torch.device("meta")
    if isinstance(model, BuiltModel):  # [model.lora] adapters included, as the trainer has them
        with meta:
            _, tokenizer = load_policy(model, cfg.tokenizer, seed=cfg.run.seed, device=meta)
        return cast(Tokenizer, tokenizer)
    assert isinstance(model, PretrainedModel)
    policy = _pretrained_on_meta(Path(model.path), model.attn_implementation)
    if model.lora is not None:  # peft installed, target_modules match linear layers
        with meta:
            apply_lora(policy, model.lora, seed=cfg.run.seed)
    return cast(Tokenizer, load_tokenizer(cfg.tokenizer, model))


def _pretrained_on_meta(path: Path, attn: str) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path} is not a Hugging Face model folder (no config.json)", path="model.path"
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            policy = AutoModelForCausalLM.from_config(config, attn_implementation=attn)  # type: ignore[no-untyped-call]
    except (OSError, ValueError, ImportError, KeyError) as err:
        raise ConfigError(f"cannot load the model in {path}: {err}", path="model.path") from err
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ConfigError(
            f"cannot load the model in {path}: no weight files (*.safetensors, *.bin)",
            path="model.path",
        )
    return cast(PreTrainedModel, policy)


def _data(recipe: LoadedRecipe, dotted: str, data: DataConfig) -> None:
    """Every source reads and some row of each is usable."""
    cfg = recipe.config
    required = list(data.required)
    if cfg.rollout.worker is None and cfg.rollout.prompt_field not in required:
        required.append(cfg.rollout.prompt_field)
    if dotted == "data":  # the pool's grouping keys: fields of every training item
        required += [name for name in cfg.pool.group_by if name not in required]
    for at, source in sources_of(dotted, data):
        with _at(recipe, at):
            rows = load_rows(source, recipe.base_dir, required=data.required)
            if rows and not any(not missing_fields(row, required) for row in rows):
                raise DataError(
                    f"no row has every field the run needs ({', '.join(required)}); the first "
                    f"row has {sorted(k for k, v in rows[0].items() if v is not None)}"
                )
