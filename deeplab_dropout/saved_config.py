"""What a run's saved (resolved) config means later: keys added since it was saved, the keys free to change
when it resumes, whether a checkpoint may be resumed with today's config, and which experiment it computes
(the identity the report groups runs by and the sweeper skips repeated jobs by).
"""
from __future__ import annotations

import json
from functools import cache
from typing import Any

import yaml

from deeplab_dropout.config import CONF_DIR, ConfigError
from deeplab_dropout.study import UNREGULARISED

# Keys added after runs were already saved, with the value that computes what those runs computed (their
# default; ADDED_COPIES: the key whose value the default copies). A saved config lacking one of them reads as if
# it held that value, so an upgrade neither refuses to resume a run nor splits a report row.
ADDED_KEYS = {"data.year": 2012, "data.augment.rotation_degrees": 0, "data.augment.repeats": 1,
              "loss.class_weights": "none", "optim.schedule": "poly", "optim.eta_min": 0.0,
              "trainer.early_stop_patience": None, "trainer.profile": False, "data.label_pad": 255,
              "data.val_list": "unique", "model.align_corners": False, "trainer.drop_last": True,
              "fidelity": "paper"}
ADDED_COPIES = {"optim.t_max_epochs": "trainer.epochs"}
REGULARISER_GROUPS = ("dropout", "placement", "schedule")  # nothing computed changes with them in `none`


@cache
def resume_free_keys() -> tuple[str, ...]:
    """Config keys that may change when a run is resumed (and that the report ignores when it groups runs,
    and sweep directory names leave out): they don't change what is computed. Listed once, in
    conf/train.yaml, where Hydra leaves them out of sweep directory names."""
    train = yaml.safe_load((CONF_DIR / "train.yaml").read_text())
    keys = train["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    return tuple(k for k in keys if k != "experiment")  # a preset's name, not a key of the run's config


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and empty dicts stay values."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_config(config: dict) -> dict:
    """A run's resolved config, flattened, with each ADDED_KEYS key it lacks at the value it ran with."""
    flat = flatten(config)
    added = {**ADDED_KEYS, **{key: flat.get(source) for key, source in ADDED_COPIES.items()}}
    return {**added, **flat}


def check_resumable(saved: dict, config: dict, checkpoint) -> None:
    """Refuse to continue a checkpoint made with another config (it would not be the same run); only the
    resume-free keys may differ. ``saved`` and ``config`` are resolved configs as plain dicts."""
    old, new = run_config(saved), run_config(config)
    for key in resume_free_keys():
        old.pop(key, None)
        new.pop(key, None)
    absent = object()
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k, absent) != new.get(k, absent))
    # A key derived from another (optim.t_max_epochs follows trainer.epochs) is named only if its source is not.
    diff = [k for k in diff if ADDED_COPIES.get(k) not in diff]
    if diff:
        first, more = diff[0], f" and {len(diff) - 1} more" if len(diff) > 1 else ""
        raise ConfigError(f"{checkpoint} was trained with a different config "
                          f"({first}: {old.get(first)!r} -> {new.get(first)!r}{more}); give another hydra.run.dir "
                          "(hydra.sweep.dir for -m), or trainer.rerun=true to move that run aside and start again")


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def ignored_keys() -> tuple[str, ...]:
    """Keys (and key prefixes) that never tell two experiments apart: they don't change what is computed."""
    return ("seed", *resume_free_keys(), "trainer.tb_images", "trainer.tb_image_classes", "trainer.keep_last",
            "data.download", "checkpoint", "hydra")


def experiment_config(config: dict, cell: str) -> dict[str, Any]:
    """The flat resolved config that defines a run's experiment (no seed, nor keys that change nothing)."""
    ignored = ignored_keys() + (REGULARISER_GROUPS if cell in UNREGULARISED else ())
    return {k: v for k, v in sorted(run_config(config).items()) if not _under(k, ignored)}


def experiment_key(config: dict, cell: str) -> str:
    """One string per experiment: equal for runs that compute the same thing up to the seed."""
    return f"{cell}|{json.dumps(experiment_config(config, cell), sort_keys=True)}"
