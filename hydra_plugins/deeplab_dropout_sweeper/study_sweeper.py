"""`hydra/sweeper: study`: Hydra's basic sweeper (the cartesian product of the sweep parameters), each
distinct run once, every job on a GPU of its own, and a failed job never stopping the others -- see
deeplab_dropout.sweep for the rules and deeplab_dropout.gpus for the GPUs."""
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
from omegaconf import DictConfig, OmegaConf, open_dict

from deeplab_dropout.sweep import SweepTask, drop_repeats, failure, failure_report, run_identity

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
    """`hydra/sweeper: study` (the default): the basic sweeper's jobs, each distinct run once."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self._seen: dict[str, str] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # Every launcher runs SweepTask: a GPU per job, and sys.exit in a job fails that job only.
        hydra_context = HydraContext(ComposeOnceLoader.wrap(hydra_context.config_loader), hydra_context.callbacks)
        super().setup(hydra_context=hydra_context, task_function=SweepTask(task_function), config=config)

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        from deeplab_dropout.study import cell_name

        batch = super().get_job_batch()
        identities = []
        for overrides in batch:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                del cfg["hydra"]
            identities.append(run_identity(OmegaConf.to_container(cfg, resolve=True), cell_name(cfg)))
        return drop_repeats(batch, identities, self._seen)

    def sweep(self, arguments: list[str]) -> Any:
        """BasicSweeper.sweep, except that a failed job doesn't stop the sweep: every batch runs, then the
        failed runs are listed (after the on_multirun_end callbacks, i.e. the report) and the process exits 1."""
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        self.overrides = self.split_arguments(overrides, self.max_batch_size)

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        returns: list[Sequence[JobReturn]] = []
        failures: list[str] = []
        n_jobs = 0
        while not self.is_done():
            batch = self.get_job_batch()
            if not batch:  # every job of it repeats an earlier run
                continue
            # get_job_batch composed every job's config: a composition error has stopped the sweep there,
            # before anything ran (what BasicSweeper's validate_batch_is_legal would compose a second time).
            results = self.launcher.launch(batch, initial_job_idx=n_jobs)
            failures += [line for line in map(failure, results) if line is not None]
            n_jobs += len(batch)
            returns.append(results)

        if failures:
            # Hydra calls on_multirun_end only when sweep() returns; the report comes before the list.
            self.hydra_context.callbacks.on_multirun_end(config=self.config,
                                                         config_name=self.config.hydra.job.config_name)
            print(failure_report(failures, n_jobs), file=sys.stderr)
            sys.exit(1)
        return returns
