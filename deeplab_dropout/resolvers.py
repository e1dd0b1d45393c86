"""The OmegaConf resolvers conf/ uses, registered on import (deeplab_dropout.config imports this module, so
every app, the sweeper and ``hydra.compose`` in a notebook have them):

- ``${checkout:PATH}``: PATH under the folder holding conf/ (the checkout), so a preset's generated dataset
  has one absolute place whatever the current directory (``data.root: ${checkout:outputs/synth-voc-demo}``).
- ``${pid:}``: this process's id: with the time, default run and sweep folders two launches in the same second
  cannot share (``outputs/runs/2026-12-03_10-00-00-48213``).
- ``${sweep_unless_given:${.overrides.task},KEY,...}``: a sweep preset's ``hydra.mode``: MULTIRUN, unless the
  command line gives every swept KEY a single value (``experiment=demo cell=spp-uout``), which is then one run
  in ``hydra.run.dir``. A sweep's jobs run with ``hydra.mode=MULTIRUN`` set by the study sweeper.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

CHECKOUT = Path(__file__).resolve().parents[1]  # the folder holding conf/ and deeplab_dropout/


def checkout_path(path: str) -> str:
    """``path`` under the checkout (an absolute ``path`` as it is)."""
    return str(CHECKOUT / path)


def is_single_value(value: str) -> bool:
    """Whether an override's value names one value, not a sweep (``a,b``, ``glob(*)``, ``range(3)``)."""
    sweep_functions = ("glob(", "range(", "choice(", "interval(", "tag(", "shuffle(", "sort(")
    return "," not in value and not value.strip().startswith(sweep_functions)


def given_keys(task_overrides: Sequence[str]) -> set[str]:
    """The keys (or groups) the command line sets to a single value."""
    keys = set()
    for override in task_overrides:
        key, sep, value = str(override).partition("=")
        if sep and is_single_value(value):
            keys.add(key.lstrip("+~"))
    return keys


def sweep_unless_given(task_overrides: Sequence[str], *swept: str) -> str:
    """``RUN`` when the command line gives each of ``swept`` one value, else ``MULTIRUN``."""
    return "RUN" if set(swept) <= given_keys(task_overrides) else "MULTIRUN"


# pid is cached like Hydra's `now`: resolved once in the launching process, the same in every job's config.
for _name, _resolver, _cached in (("checkout", checkout_path, False), ("pid", os.getpid, True),
                                  ("sweep_unless_given", sweep_unless_given, False)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver, use_cache=_cached)
