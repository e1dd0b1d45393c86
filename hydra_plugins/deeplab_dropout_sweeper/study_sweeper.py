"""`hydra/sweeper: study`: Hydra's basic sweeper (the cartesian product of the sweep parameters), each
distinct run once -- see deeplab_dropout.sweep for the rule."""
from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import OmegaConf, open_dict

from deeplab_dropout.sweep import drop_repeats, run_identity


class StudySweeper(BasicSweeper):
    """`hydra/sweeper: study` (the default): the basic sweeper's jobs, each distinct run once."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self._seen: dict[str, str] = {}

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        from deeplab_dropout.model import cell_name  # torch: only once a sweep runs, not at plugin scan

        batch = super().get_job_batch()
        identities = []
        for overrides in batch:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                del cfg["hydra"]
            identities.append(run_identity(OmegaConf.to_container(cfg, resolve=True), cell_name(cfg)))
        return drop_repeats(batch, identities, self._seen)
