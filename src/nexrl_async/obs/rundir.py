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
  failed_starts/   the records of earlier starts that failed before their first step
```

A fresh run refuses a folder that already holds a run, so two runs never interleave their
records; resuming reuses it and every log is appended to. A folder whose records show a start
that never trained (``events.jsonl`` without a ``trained`` event, no metrics row, no
checkpoint: the recipe's model failed to load, a server failed to launch, ...) does not count as
a run: a fresh start moves those records to ``failed_starts/<time>/`` and reuses the folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from loguru import logger

from nexrl_async.core.errors import ConfigError, DataError
from nexrl_async.obs.ledger import RunStarted, Trained, read_events

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

        Without ``resume``, ``root`` must be missing, empty or hold only starts that never
        trained (:meth:`never_trained`; their records move to ``failed_starts/``): reusing a
        folder that holds a run raises :class:`ConfigError` (pick another ``run.output_dir`` or
        resume). With ``resume`` an existing folder is reused as is (missing sub-folders are
        made).
        """
        run_dir = cls(root)
        path = run_dir.root
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"run.output_dir = {str(path)!r}: exists and is not a folder",
                path="run.output_dir",
            )
        if not resume and path.is_dir() and run_dir._holds_files():
            if run_dir.never_trained():
                run_dir._set_aside()
            else:
                raise ConfigError(
                    f"run.output_dir = {str(path)!r}: the folder already holds a run; "
                    "resume it or choose another run.output_dir (or run.name)",
                    path="run.output_dir",
                )
        for name in _FOLDERS:
            (path / name).mkdir(parents=True, exist_ok=True)
        return run_dir

    def never_trained(self) -> bool:
        """Whether the folder's records are those of starts that failed before their first
        step: a ledger with a ``run_started`` and no ``trained`` event, no metrics row and no
        checkpoint. A folder without a ledger (or with one that does not parse) is not."""
        if not self.events_path.is_file():
            return False
        try:
            events = read_events(self.events_path)
        except DataError:
            return False
        if not any(isinstance(e, RunStarted) for e in events):
            return False
        if any(isinstance(e, Trained) for e in events):
            return False
        if self.metrics_path.is_file() and self.metrics_path.read_text(encoding="utf-8").strip():
            return False
        return not (self.checkpoints_dir.is_dir() and any(self.checkpoints_dir.iterdir()))

    def _holds_files(self) -> bool:
        """Any file outside ``failed_starts/`` (empty folders, the bare layout, do not count)."""
        kept = self.failed_starts_dir
        return any(p.is_file() for p in self.root.rglob("*") if kept not in (p, *p.parents))

    def _set_aside(self) -> None:
        """Move everything but ``failed_starts/`` into ``failed_starts/<time>/``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.failed_starts_dir / stamp
        n = 1
        while target.exists():
            n += 1
            target = self.failed_starts_dir / f"{stamp}-{n}"
        target.mkdir(parents=True)
        for entry in list(self.root.iterdir()):
            if entry != self.failed_starts_dir:
                entry.rename(target / entry.name)
        logger.info("{}: a start that never trained is kept in {}", self.root, target)

    @property
    def failed_starts_dir(self) -> Path:
        """Records of earlier starts that failed before their first step."""
        return self.root / "failed_starts"

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
