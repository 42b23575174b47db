"""The ``nexrl-async`` command line (also ``python -m nexrl_async`` and ``torchrun -m ...``).

Exit codes: 0 ok, 2 config or usage error, 1 runtime failure. Errors print one line per cause,
never a traceback (set ``NEXRL_TRACEBACK=1`` to see one).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from nexrl_async.__about__ import __version__
from nexrl_async.core.errors import ConfigError, NexRLError
from nexrl_async.core.process import exit_process

app = typer.Typer(
    name="nexrl-async",
    help="Async RL post-training engine: recipes, runs, and the local inference server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe value: KEY.PATH=TOML_VALUE (repeatable)."),
]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe TOML file.", show_default=False)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nexrl-async {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """nexrl_async: RL post-training for LLM agents, from a laptop CPU to GPU clusters."""


@app.command()
def check(recipe: RecipeArg, set_: SetOption = None) -> None:
    """Check a recipe as ``run`` would at its start, without running it: schema, cross-field
    rules, paths, optional backends, user code and its shape, model and tokenizer, data."""
    from nexrl_async.config.loader import load_recipe
    from nexrl_async.config.preflight import summary
    from nexrl_async.engine.startup import preflight_run

    loaded = load_recipe(recipe, set_ or [])
    preflight_run(loaded)
    typer.echo(summary(loaded))
    typer.echo("ok")


@app.command()
def run(
    recipe: RecipeArg,
    set_: SetOption = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Run folder (default: run.output_dir)."),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue from a checkpoint: 'auto' (the run folder's newest one; fresh start "
            "when none) or the path of a checkpoint folder.",
        ),
    ] = None,
) -> None:
    """Train: launch the inference fleet, stream rollouts, train, publish weights."""
    from nexrl_async.config.loader import load_recipe
    from nexrl_async.inference.fleet.prewarm import warm_count, warm_local_servers

    loaded = load_recipe(recipe, set_ or [])
    with warm_local_servers(warm_count(loaded.config.inference)):  # their imports overlap ours
        from nexrl_async.engine.run import run_recipe

        reason = run_recipe(loaded, output=output, resume=resume)
    if reason.startswith("interrupted"):
        raise SystemExit(143 if "SIGTERM" in reason else 130)  # 128 + the signal's number


@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", help="Local HF model folder.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 30000,
    api_key: Annotated[str | None, typer.Option(help="Bearer key clients must send.")] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    weight_version: Annotated[str, typer.Option(help="Initial weight_version label.")] = "0",
    context_length: Annotated[int | None, typer.Option(help="Override the context length.")] = None,
    torch_threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = 0,
) -> None:
    """Serve a local model over SGLang's HTTP API (CPU or one GPU), until Ctrl-C."""
    import msgspec

    from nexrl_async.inference.local.server import ServeOptions, main_serve

    try:
        options = msgspec.convert(
            {
                "model_dir": str(model), "host": host, "port": port, "api_key": api_key,
                "max_batch": max_batch, "device": device, "dtype": dtype,
                "weight_version": weight_version, "context_length": context_length,
                "torch_threads": torch_threads,
            },
            ServeOptions,
        )  # fmt: skip
    except msgspec.ValidationError as err:
        raise ConfigError(f"serve: {err}") from None
    main_serve(options)


def _fail(code: int, lines: list[str]) -> NoReturn:
    for line in lines:
        typer.echo(f"error: {line}", err=True)
    exit_process(code)


def _causes(err: BaseException) -> list[BaseException]:
    if isinstance(err, BaseExceptionGroup):
        return [c for sub in err.exceptions for c in _causes(sub)]
    return [err]


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the typer app and map errors to exit codes and one-line messages."""
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as done:
        exit_process(_exit_code(done))
    except KeyboardInterrupt:
        _fail(130, ["interrupted"])
    except BaseException as err:
        if os.environ.get("NEXRL_TRACEBACK"):
            raise
        causes = _causes(err)
        code = 2 if all(isinstance(c, ConfigError) for c in causes) else 1
        _fail(code, [_describe(c) for c in causes])
    exit_process(0)


def _exit_code(done: SystemExit) -> int:
    if done.code is None:
        return 0
    if isinstance(done.code, int):
        return done.code
    typer.echo(str(done.code), err=True)
    return 1


def _describe(err: BaseException) -> str:
    if isinstance(err, NexRLError):
        return str(err)
    return f"{type(err).__name__}: {err}"


if __name__ == "__main__":
    main(sys.argv[1:])
