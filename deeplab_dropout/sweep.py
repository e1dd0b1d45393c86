"""A sweep's jobs as the study sweeper (`hydra/sweeper: study`, the default: `hydra_plugins/deeplab_dropout_sweeper`,
since Hydra loads plugins only from that namespace) runs them: which jobs are the same run, the task every
launcher runs, and the failures a sweep ends with. The plan made before any job starts: deeplab_dropout.plan.

A run without a regulariser computes the same thing under every schedule (the ramp of p = 0 changes
nothing), so `-m 'cell=glob(*)' schedule=constant,linear` trains `none` once: 31 runs, not 32. The
report shows that one run under both schedules.

A job that fails doesn't stop the others: the sweeper runs them all, then lists the failed ones
(``failure_report``) and exits non-zero; the same command again retries them (completed runs are skipped).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf

from deeplab_dropout.cli import InputError
from deeplab_dropout.config import one_line
from deeplab_dropout.saved_config import experiment_key

log = logging.getLogger(__name__)


def run_identity(config: dict, cell: str) -> str:
    """What a job computes: its experiment (as the report groups runs) and its seed."""
    return f"{experiment_key(config, cell)}|seed={config.get('seed')}"


class JobExited(RuntimeError):
    """A job called sys.exit: that job failed, the sweep goes on."""


class SweepTask:
    """The task function as the study sweeper hands it to every launcher: each job on a GPU of its own
    (deeplab_dropout.gpus), a job that calls sys.exit fails alone instead of ending the whole sweep, and after
    each job a line with the sweep's progress and ETA (``progress()``, e.g. plan.SweepProgress.line).

    Picklable, so it travels to joblib, submitit and Ray workers with the function it wraps."""

    def __init__(self, task_function: Callable[[DictConfig], Any], progress: Callable[[], str] | None = None) -> None:
        self.task_function = task_function
        self.progress = progress

    def __call__(self, cfg: DictConfig) -> Any:
        from deeplab_dropout.gpus import gpu_for_job

        try:
            with gpu_for_job(cfg):
                try:
                    return self.task_function(cfg)
                except SystemExit as e:
                    if e.code in (0, None) or (isinstance(e.code, int) and e.code > 128):
                        raise  # a clean exit, or a signal (Ctrl-C, SIGTERM): the whole sweep stops
                    raise JobExited(f"exited with status {e.code}") from e
        finally:
            if self.progress is not None:
                log.info(self.progress())


def failure(job: JobReturn) -> str | None:
    """``<run dir name>: <one-line error>`` for a failed job (its traceback goes to the log), else None."""
    if job.status != JobStatus.FAILED:
        return None
    name = (OmegaConf.select(job.hydra_cfg, "hydra.job.override_dirname") if job.hydra_cfg is not None
            else None) or ",".join(job.overrides or []) or "(no overrides)"
    error = job._return_value  # the exception; `return_value` would raise it
    # Bad input (InputError; config and data errors are ValueErrors) says all in one line; anything else
    # keeps its traceback.
    expected = isinstance(error, InputError | ValueError)
    log.error("run %s failed: %s", name, one_line(error), exc_info=None if expected else error)
    return f"{name}: {one_line(error)}"


def failure_report(failures: Sequence[str], n_runs: int) -> str:
    """The lines a sweep ends with when some of its runs failed."""
    return "\n".join([f"failed: {len(failures)} of {n_runs} runs:", *(f"  {line}" for line in failures)])
