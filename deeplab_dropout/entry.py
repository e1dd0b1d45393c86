"""Console entry points around Hydra apps: a mistyped override (group option, key, syntax) prints one line,
``error: ...``, and exits 2, instead of Hydra's multi-line report.

Hydra's ``run_and_report`` prints its own report and exits 1 unless ``HYDRA_FULL_ERROR=1`` (documented at
https://hydra.cc/docs/tutorials/basic/running_your_app/debugging/); with it set, the exception reaches
``run_app``, which shortens the errors raised before the task function ran (while Hydra parsed the
overrides, composed the config or made the run dir) and re-raises the rest.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

EXIT_INPUT = 2  # the exit status of every input error (config, data, run dir)


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


def _or_none(compute: Callable[[], object]) -> object:
    try:
        return compute()
    except Exception:  # a config too broken to say more: the error line still says what went wrong
        return None


def _same_run(data: dict, cfg: DictConfig) -> bool:
    """Whether results.json ``data`` is of this config's run (as resuming decides it)."""
    from deeplab_dropout.saved_config import check_resumable

    try:
        check_resumable(data.get("config") or {}, OmegaConf.to_container(cfg, resolve=True), Path())
    except (ValueError, OmegaConfBaseException):  # another config (ConfigError), or one that does not resolve
        return False
    return True


def record_failure(path: Path, cfg: DictConfig, message: str) -> None:
    """Mark results.json at ``path`` failed with ``message``, writing a minimal one if set-up failed before
    there was one. A completed run's results.json is never touched."""
    from deeplab_dropout.results import write_json
    from deeplab_dropout.study import cell_name

    path = Path(path)
    if path.exists():
        data = _or_none(lambda: json.loads(path.read_text()))
        # Never a completed run's, nor another config's (the refusal that brought us here protects it).
        if not isinstance(data, dict) or data.get("status") == "completed" or not _same_run(data, cfg):
            return
    else:
        config = _or_none(lambda: OmegaConf.to_container(cfg, resolve=True)) or _or_none(
            lambda: OmegaConf.to_container(cfg, resolve=False))
        data = {"cell": _or_none(lambda: cell_name(cfg)), "config": config}
    data.update(status="failed", error=message, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:
        write_json(path, data)
    except OSError:  # e.g. an unwritable run dir: the error line on stderr is all there is
        pass
