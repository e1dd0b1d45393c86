"""`hydra/sweeper: study`: Hydra's basic sweeper (the cartesian product of the sweep parameters), planned before
any job starts (deeplab_dropout.plan: every job validated, its run dir's state, its estimated time), each distinct
run once, every job on a GPU of its own, a line of progress after each job, and a failed job never stopping the
others -- see deeplab_dropout.sweep for the rules and deeplab_dropout.gpus for the GPUs.

This module is imported whenever Hydra starts (it scans hydra_plugins/): it imports no torch."""
from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from deeplab_dropout.cli import EXIT_INPUT
from deeplab_dropout.plan import (
    PlannedJob,
    SweepProgress,
    compose_job,
    errors,
    format_plan,
    job_overrides,
    mark_repeats,
    mark_states,
    other_sweep,
)
from deeplab_dropout.progress import duration
from deeplab_dropout.sweep import SweepTask, failure, failure_report

log = logging.getLogger(__name__)


class ComposeOnceLoader(ConfigLoaderImpl):
    """Hydra's config loader, composing each job's config once per sweep: the sweeper composes it to find
    repeated runs, and the launcher, composing the same overrides next, gets that config (~0.2 s a job)."""

    _composed: dict[tuple[str, ...], DictConfig]

    @classmethod
    def wrap(cls, loader: Any) -> Any:
        """``loader`` as a ComposeOnceLoader (the same state); any other loader class as it is."""
        if type(loader) is not ConfigLoaderImpl:
            return loader
        once = cls.__new__(cls)
        once.__dict__.update(loader.__dict__, _composed={})
        return once

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        # The first call keeps the composed config and hands out a copy; the second hands out the kept one.
        key = tuple(sweep_overrides)
        if key in self._composed:
            return self._composed.pop(key)
        self._composed[key] = super().load_sweep_config(master_config, sweep_overrides)
        return copy.deepcopy(self._composed[key])


class StudySweeper(BasicSweeper):
    """`hydra/sweeper: study` (the default): the basic sweeper's jobs, planned before any of them starts (every
    job composed and validated, its run dir's state known; deeplab_dropout.plan), each distinct run once."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 plan: bool = False) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.plan_only = plan

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # Every launcher runs SweepTask: a GPU per job, and sys.exit in a job fails that job only.
        hydra_context = HydraContext(ComposeOnceLoader.wrap(hydra_context.config_loader), hydra_context.callbacks)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def make_plan(self) -> list[PlannedJob]:
        """Every job of every batch, composed, validated and with its run dir's state (nothing is written)."""
        from deeplab_dropout.cli import describe

        def compose(overrides: list[str]) -> DictConfig:
            return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

        jobs = [compose_job(compose, job_overrides(overrides), describe)
                for batch in self.overrides for overrides in batch]
        mark_repeats(jobs)
        if not errors(jobs):
            mark_states(jobs)
        return jobs

    def sweep(self, arguments: list[str]) -> Any:
        """Plan every job first: an invalid one (or another sweep's runs in the folder) stops the sweep before
        anything is made, in one line per bad job, exit 2; ``hydra.sweeper.plan=true`` prints the plan and exits.
        Then launch the jobs to run; a failed job doesn't stop the others: they all run, then the failed runs are
        listed (after the on_multirun_end callbacks, i.e. the report) and the process exits 1."""
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        self.overrides = self.split_arguments(overrides, None)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        jobs = self.make_plan()
        lines = errors(jobs)
        rerun = bool(OmegaConf.select(self.config, "trainer.rerun", default=False))
        if not lines and not rerun and sweep_dir.is_dir() and (refusal := other_sweep(sweep_dir, jobs)):
            lines = [refusal]
        if lines and not self.plan_only:
            print("\n".join(f"error: {line}" for line in lines), file=sys.stderr)
            sys.exit(EXIT_INPUT)
        from deeplab_dropout.estimate import estimate_times  # torch and the models: only from here on

        device = estimate_times(jobs)
        if self.plan_only:
            print(format_plan(jobs, sweep_dir, device))
            print("\n".join(f"error: {line}" for line in lines), file=sys.stderr, end="\n" if lines else "")
            sys.exit(EXIT_INPUT if lines else 0)
        to_run = [job for job in jobs if job.runs]
        for job in jobs:
            if not job.runs:
                log.info("%s: %s", job.name, job.status)
        log.info("sweep: %d jobs to run in %s (%d skipped), estimated %s on %s; hydra.sweeper.plan=true lists them",
                 len(to_run), sweep_dir, len(jobs) - len(to_run), duration(sum(job.seconds or 0 for job in to_run)),
                 device)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        progress = SweepProgress([str(job.run_dir) for job in to_run])
        self.launcher.task_function = SweepTask(self.launcher.task_function, progress.line)
        returns: list[Sequence[JobReturn]] = []
        failures: list[str] = []
        size = self.max_batch_size or len(to_run) or 1
        for start in range(0, len(to_run), size):
            batch = [job.overrides for job in to_run[start:start + size]]
            results = self.launcher.launch(batch, initial_job_idx=start)
            failures += [line for line in map(failure, results) if line is not None]
            returns.append(results)

        if failures:
            # Hydra calls on_multirun_end only when sweep() returns; the report comes before the list.
            self.hydra_context.callbacks.on_multirun_end(config=self.config,
                                                         config_name=self.config.hydra.job.config_name)
            print(failure_report(failures, len(to_run)), file=sys.stderr)
            sys.exit(1)
        return returns
