"""The run folder: where a run writes its config, metrics, events, samples and checkpoints.

```
<root>/
  config.toml      the resolved recipe
  metrics.jsonl    one line per step: {"step", "time", ...metrics}
  events.jsonl     the RunLedger
  samples/         decoded samples, every ``logging.samples_every_steps`` and the last step
  checkpoints/     step folders
  plots/           figures drawn from metrics.jsonl at the end (``obs.plots``)
  logs/            rank<r>.log per rank
  weights/         safetensors written for disk weight publication
  tensorboard/     TensorBoard event files (made by the sink when enabled)
```

A fresh run refuses a folder that already holds files, so two runs never interleave their
records; resuming reuses it and every log is appended to.
"""

from __future__ import annotations

from pathlib import Path

from nexrl_async.core.errors import ConfigError

_FOLDERS = ("samples", "checkpoints", "plots", "logs", "weights")


class RunDir:
    """Paths of one run folder. Building one touches no disk; :meth:`create` makes the folders."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @classmethod
    def create(cls, root: Path | str, *, resume: bool) -> RunDir:
        """Make the folder layout under ``root`` and return it.

        Without ``resume``, ``root`` must be missing or empty: reusing a folder with files in it
        raises :class:`ConfigError` (pick another ``run.output_dir`` or resume). With
        ``resume`` an existing folder is reused as is (missing sub-folders are made).
        """
        run_dir = cls(root)
        path = run_dir.root
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"run.output_dir = {str(path)!r}: exists and is not a folder",
                path="run.output_dir",
            )
        if not resume and path.is_dir() and any(path.iterdir()):
            raise ConfigError(
                f"run.output_dir = {str(path)!r}: the folder already holds a run; "
                "resume it or choose another run.output_dir (or run.name)",
                path="run.output_dir",
            )
        for name in _FOLDERS:
            (path / name).mkdir(parents=True, exist_ok=True)
        return run_dir

    @property
    def config_path(self) -> Path:
        """The resolved recipe, ``config.toml``."""
        return self.root / "config.toml"

    @property
    def metrics_path(self) -> Path:
        """``metrics.jsonl``."""
        return self.root / "metrics.jsonl"

    @property
    def events_path(self) -> Path:
        """``events.jsonl`` (the RunLedger)."""
        return self.root / "events.jsonl"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def weights_dir(self) -> Path:
        return self.root / "weights"

    @property
    def tensorboard_dir(self) -> Path:
        """Made by the TensorBoard sink when ``logging.tensorboard`` is on."""
        return self.root / "tensorboard"
