"""`hydra.callbacks.run_guard` (conf/train.yaml): the run directory's guard, in the hooks Hydra calls around a
job. A single run takes the run dir's lock (RunDir.lock) before Hydra writes ``.hydra/`` and the log there, so
a second process on the same folder stops before it changes anything. A run dir holding a completed run is left
as it is: no ``.hydra/`` rewritten, no log appended (the task then skips the run, or refuses another config),
so relaunching a finished run changes no byte and works on read-only storage. A job of a multirun takes its
lock as its task starts (train.run); the sweep plan never launches a completed run.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from deeplab_dropout.cli import EXIT_INPUT
from deeplab_dropout.rundir import RunDir, RunDirBusy


def write_nothing(config: DictConfig) -> None:
    """Make Hydra leave the run dir as it is: no ``.hydra/`` (hydra.output_subdir=null), no log file."""
    with read_write(config), open_dict(config):
        config.hydra.output_subdir = None
        logging = config.hydra.job_logging
        if logging is not None and "handlers" in logging and "file" in logging.handlers:
            del logging.handlers["file"]
            for node in [logging.get("root"), *(logging.get("loggers") or {}).values()]:
                if node is not None and "handlers" in node:
                    node.handlers = [h for h in node.handlers if h != "file"]


class RunGuard(Callback):
    """Lock the run dir before anything is written there; leave a completed run's folder untouched."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.sweeper.plan", default=False):  # a plan asked for, a run about to start
            print("error: hydra.sweeper.plan=true plans a multirun, and this is a single run; add -m to see its plan",
                  file=sys.stderr)
            raise SystemExit(EXIT_INPUT)
        run_dir = RunDir(Path(str(config.hydra.run.dir)))
        if run_dir.is_completed() and not OmegaConf.select(config, "trainer.rerun", default=False):
            write_nothing(config)
            return
        try:
            run_dir.lock()
        except RunDirBusy as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(EXIT_INPUT) from None
        except OSError:  # a run dir that cannot be made: Hydra, making it next, says so in one line
            pass
