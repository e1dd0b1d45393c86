"""The one wrapper around every command: bad input (a mistyped override, a config value, the data, a run
directory, a file) prints one line, ``error: ...``, and exits 2; in a multirun job it is recorded in the
job's results.json and the sweep goes on. Anything else keeps its traceback.

Hydra's ``run_and_report`` prints its own report and exits 1 unless ``HYDRA_FULL_ERROR=1`` (documented at
https://hydra.cc/docs/tutorials/basic/running_your_app/debugging/); with it set, the exception reaches
``run_app``, which shortens the errors raised before the task function ran (while Hydra parsed the
overrides, composed the config or made the run dir) and re-raises the rest.
"""
from __future__ import annotations

import functools
import inspect
import os
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
from omegaconf.errors import OmegaConfBaseException

from deeplab_dropout.config import ConfigError, one_line
from deeplab_dropout.data.voc import DatasetError
from deeplab_dropout.rundir import RunDir

EXIT_INPUT = 2  # the exit status of every input error (config, data, run dir)
# What is wrong with the input rather than the code, when raised while a command sets up: the config
# (weights included), the data, a file.
INPUT_ERRORS = (ConfigError, DatasetError, OSError)


class InputError(Exception):
    """Something wrong with the config, data, weights or run dir, found during set-up (one-line message)."""


@contextmanager
def input_errors() -> Iterator[None]:
    """Turn the INPUT_ERRORS raised inside into a one-line InputError (wrap set-up code, not training)."""
    try:
        yield
    except INPUT_ERRORS as e:
        raise InputError(one_line(e)) from e


def run_job(job: Callable[[DictConfig, RunDir], Any], cfg: DictConfig) -> Any:
    """Call ``job(cfg, run_dir)`` in the Hydra run dir (from a Hydra app's task function). Bad input prints
    one line, ``error: ...``; a single run then exits 2 (results.json, if any, already says "failed"); a
    multirun job records the error in its results.json and re-raises, so Hydra marks that job FAILED and the
    sweep goes on."""
    hydra_cfg = HydraConfig.get()
    run_dir = RunDir(Path(hydra_cfg.runtime.output_dir))
    try:
        return job(cfg, run_dir)
    except (InputError, DatasetError) as e:
        message = one_line(e)
        print(f"error: {message}", file=sys.stderr)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(EXIT_INPUT)
        run_dir.record_failure(cfg, message)
        raise


def command(main: Callable[..., int | None]) -> Callable[..., int]:
    """An argparse command's ``main``: an input error (InputError, or INPUT_ERRORS) prints one line and
    returns 2."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except (InputError, *INPUT_ERRORS) as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return EXIT_INPUT
    return wrapped


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def describe(e: BaseException) -> str:
    """One line for an error Hydra raised while parsing overrides or composing the config."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, option = e.missing_cfg_file.rpartition("/")
        if group:
            return f"{group}={option} is not an option of group {group} ({', '.join(sorted(e.options))})"
    if isinstance(e, OSError) and not isinstance(e, HydraException) and e.filename is not None:
        return f"cannot write {e.filename}: {e.strerror or e}"  # e.g. the run dir, as Hydra makes it
    message = _first_line(str(e))
    if message.startswith("Could not override '"):  # "Could not override 'trainer.foo'." + a key error
        key = message.split("'")[1]
        cause = e.__cause__
        if isinstance(cause, OmegaConfBaseException) and "not in" in str(cause):
            return f"{key} is not a config key (use +{key}=... to add one)"
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
