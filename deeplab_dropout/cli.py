"""The one wrapper around every command: bad input (a mistyped override, a config value, the data, a run
directory, a file) prints one line, ``error: ...``, and exits 2; in a multirun job it is recorded in the
job's results.json and the sweep goes on. Anything else keeps its traceback.

Hydra's ``run_and_report`` prints its own report and exits 1 unless ``HYDRA_FULL_ERROR=1`` (documented at
https://hydra.cc/docs/tutorials/basic/running_your_app/debugging/); with it set, the exception reaches
``run_app``, which shortens the errors raised before the task function ran (while Hydra parsed the
overrides, composed the config or made the run dir) and re-raises the rest.

This module imports no torch (nor numpy): the console scripts (deeplab_dropout.commands) import it to print
``--help`` and every input error before the training code is loaded.
"""
from __future__ import annotations

import functools
import inspect
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from deeplab_dropout.config import ConfigError, did_you_mean, one_line, unknown_key

EXIT_INPUT = 2  # the exit status of every input error (config, data, run dir)
# What is wrong with the input rather than the code, when raised while a command sets up: the config
# (weights included), the data (deeplab_dropout.data.voc.DatasetError, see is_dataset_error), a file.
INPUT_ERRORS = (ConfigError, OSError)


class InputError(Exception):
    """Something wrong with the config, data, weights or run dir, found during set-up (one-line message)."""


def is_dataset_error(e: BaseException) -> bool:
    """Whether ``e`` is a DatasetError (bad data on disk). Its module, data.voc, imports torch, which this one
    does not: a DatasetError can only have been raised once data.voc was imported, so look it up there."""
    voc = sys.modules.get("deeplab_dropout.data.voc")
    return voc is not None and isinstance(e, voc.DatasetError)


@contextmanager
def input_errors() -> Iterator[None]:
    """Turn the INPUT_ERRORS and DatasetErrors raised inside into a one-line InputError (wrap set-up code, not
    training)."""
    try:
        yield
    except Exception as e:
        if not (isinstance(e, INPUT_ERRORS) or is_dataset_error(e)):
            raise
        raise InputError(one_line(e)) from e


def remove_unused_run_dir(path: Path, keep_if_more_than: set[str]) -> None:
    """Remove the run dir Hydra made for a run that stopped at start-up: only if it holds nothing but the
    names in ``keep_if_more_than`` (Hydra's ``.hydra/``, the job's log, the run dir's lock), so no
    results.json, checkpoint or event file of any run, nor anything else."""
    if path.is_dir() and {p.name for p in path.iterdir()} <= keep_if_more_than:
        shutil.rmtree(path, ignore_errors=True)


def run_job(job: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> Any:
    """Call ``job(cfg, run_dir)`` in the Hydra run dir (from a Hydra app's task function). Bad input prints
    one line, ``error: ...``; a single run then exits 2 (results.json, if any, already says "failed"; a run
    dir holding only what Hydra wrote is removed); a multirun job records the error in its results.json and
    re-raises, so Hydra marks that job FAILED and the sweep goes on."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return job(cfg, run_dir)
    except Exception as e:
        if not (isinstance(e, InputError) or is_dataset_error(e)):
            raise
        from deeplab_dropout.rundir import LOCK, RunDir  # (numpy) only a failed run needs them

        message = one_line(e)
        print(f"error: {message}", file=sys.stderr)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            remove_unused_run_dir(run_dir, {".hydra", f"{hydra_cfg.job.name}.log", str(LOCK)})
            sys.exit(EXIT_INPUT)
        RunDir(run_dir).record_failure(cfg, message)
        raise


def command(main: Callable[..., int | None]) -> Callable[..., int]:
    """An argparse command's ``main``: an input error (InputError, INPUT_ERRORS, a DatasetError) prints one
    line and returns 2."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except Exception as e:
            if not (isinstance(e, (InputError, *INPUT_ERRORS)) or is_dataset_error(e)):
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            return EXIT_INPUT
    return wrapped


def is_path_argument(arg: str) -> bool:
    """Whether a command-line argument is deeplab-dropout-eval's RUN_DIR_OR_CHECKPOINT rather than an
    override or an option."""
    return os.path.exists(os.path.expanduser(arg)) or not (arg.startswith(("-", "~")) or "=" in arg)


def take_path_argument(argv: list[str]) -> str | None:
    """Take RUN_DIR_OR_CHECKPOINT out of ``argv`` (it comes first; a sweep's run folder, with ``=`` and ``,``
    in its name, needs no escaping then), so Hydra parses the rest."""
    return argv.pop(1) if len(argv) > 1 and is_path_argument(argv[1]) else None


def set_checkpoint(cfg: DictConfig, path: str | None) -> None:
    """``cfg.checkpoint`` = the RUN_DIR_OR_CHECKPOINT argument, if one was given (not with checkpoint=...)."""
    if path is not None:
        if cfg.checkpoint is not None:
            raise InputError(f"give the checkpoint once: {path} or checkpoint=...")
        cfg.checkpoint = path


def checkpoint_file(path: str | os.PathLike, best: str | os.PathLike) -> Path:
    """The checkpoint a RUN_DIR_OR_CHECKPOINT names: the file, or a run dir's ``best`` (checkpoints/best.pt).
    A sweep folder (several run dirs) or nothing there is an InputError, the sweep's naming its runs."""
    path = Path(path).expanduser()
    if path.is_dir():
        runs = [] if (path / best).exists() else sorted({p.parent for p in path.rglob("results.json")} - {path})
        if runs:
            shown = ", ".join(str(run) for run in runs[:5]) + (", …" if len(runs) > 5 else "")
            raise InputError(f"{path} is a sweep of {len(runs)} run{'s' * (len(runs) != 1)}; give one of them: "
                             f"{shown}")
        if (path / "multirun.yaml").exists():
            raise InputError(f"{path} is a sweep with no run yet (no results.json in it)")
        path = path / best
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    return path


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def describe(e: BaseException) -> str:
    """One line for an error Hydra raised while parsing overrides or composing the config, with the closest
    option or key when there is one (``cell=al-dropblock``: did you mean cell=all-dropblock?)."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, option = e.missing_cfg_file.rpartition("/")
        if group:
            options = sorted(e.options)
            return (f"{group}={option} is not an option of group {group}{did_you_mean(option, options, group + '=')}"
                    f" (options: {', '.join(options)})")
    if isinstance(e, OSError) and not isinstance(e, HydraException) and e.filename is not None:
        return f"cannot write {e.filename}: {e.strerror or e}"  # e.g. the run dir, as Hydra makes it
    message = _first_line(str(e))
    if message.startswith("Could not override '"):  # "Could not override 'trainer.foo'." + a key error
        key = message.split("'")[1]
        cause = e.__cause__
        if isinstance(cause, ConfigAttributeError | ConfigKeyError) and "not in" in str(cause):
            # The first missing key of the override (trainer.foo.bar: trainer.foo) and its node's keys.
            node = cause.parent_node
            return unknown_key(str(cause.full_key or key), list(node.keys()) if node is not None else [])
        if cause is not None:
            return f"cannot override {key}: {_first_line(str(cause))}"
    if isinstance(e, OverrideParseException):
        return f"cannot parse the overrides: {message}"
    return message or type(e).__name__


def _raised_in_task(e: BaseException, task: Callable) -> bool:
    # The task function's frame is on the traceback of whatever it raised (Hydra re-raises the same object).
    return any(frame.f_code is task.__code__ for frame, _ in traceback.walk_tb(e.__traceback__))


def run_app(app: Callable[[], object]) -> object:
    """Call a ``@hydra.main`` app. An error before its task function runs (a mistyped override, a config
    that does not compose, a run dir that cannot be made) prints one line and exits 2; errors raised by the
    task itself propagate with their traceback."""
    task = inspect.unwrap(app)
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return app()
    except (HydraException, OmegaConfBaseException, OSError) as e:
        if _raised_in_task(e, task):
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
