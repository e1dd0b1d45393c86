"""Which jobs of a sweep are the same run: the rule behind `hydra/sweeper: study` (the default sweeper,
`hydra_plugins/deeplab_dropout_sweeper`, since Hydra loads plugins only from that namespace).

A run without a regulariser computes the same thing under every schedule (the ramp of p = 0 changes
nothing), so `-m 'cell=glob(*)' schedule=constant,linear` trains `none` once: 31 runs, not 32. The
report shows that one run under both schedules.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from deeplab_dropout.report import experiment_key

log = logging.getLogger(__name__)


def run_identity(config: dict, cell: str) -> str:
    """What a job computes: its experiment (as the report groups runs) and its seed."""
    return f"{experiment_key(config, cell)}|seed={config.get('seed')}"


def drop_repeats(jobs: Sequence[Sequence[str]], identities: Sequence[str], seen: dict[str, str]
                 ) -> list[Sequence[str]]:
    """The jobs whose identity no earlier job had (``seen`` maps identity -> the first job's overrides)."""
    kept = []
    for overrides, identity in zip(jobs, identities, strict=True):
        name = ",".join(overrides)
        if identity in seen:
            log.info("skipping %s: it computes the same run as %s (a run without a regulariser is the same "
                     "under every schedule)",
                     name, seen[identity])
            continue
        seen[identity] = name
        kept.append(overrides)
    return kept

