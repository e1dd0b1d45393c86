"""The plan of a multirun, made before any job starts (the study sweeper, hydra_plugins/deeplab_dropout_sweeper):
every job composed and validated, its run directory, what launching it would do there (new, completed: skipped,
resumes after epoch k, repeats an earlier job: skipped) and its estimated time on this device.

An invalid job stops the whole sweep before anything is made or run: one line per bad job, exit 2. So does a
sweep folder holding completed runs of another sweep of the same cells with a different config (the report
would mix the two), unless trainer.rerun=true. ``hydra.sweeper.plan=true`` prints the plan and exits.
"""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from deeplab_dropout.config import validate
from deeplab_dropout.progress import duration
from deeplab_dropout.rundir import RESULTS, RunDir
from deeplab_dropout.saved_config import experiment_config
from deeplab_dropout.study import cell_name
from deeplab_dropout.sweep import run_identity

MULTIRUN_JOB = "hydra.mode=MULTIRUN"  # added to every job's overrides: a job of a sweep is one, whatever the preset


@dataclass
class PlannedJob:
    """One job of the sweep as the plan sees it."""

    overrides: list[str]  # as the launcher gets them (MULTIRUN_JOB last)
    name: str  # hydra.job.override_dirname: the run dir's name under the sweep dir
    run_dir: Path | None = None
    cfg: DictConfig | None = None  # the job's config without the hydra node
    status: str = "new"
    error: str | None = None
    seconds: float | None = None  # estimated time on this device (None: not estimated)
    identity: str = ""  # what it computes (sweep.run_identity): equal identities are one run
    coordinates: tuple = field(default=())  # (cell, schedule, seed): its place in the report's tables

    @property
    def runs(self) -> bool:
        """Whether the sweep launches this job."""
        return self.error is None and not self.status.endswith("skipped")


def job_overrides(overrides: Sequence[str]) -> list[str]:
    """A job's overrides as launched: a job of a sweep runs as one (a preset's ``hydra.mode`` may say RUN when
    the command line names one value of its swept key)."""
    return [*overrides, MULTIRUN_JOB]


def run_dir_of(job_cfg: DictConfig) -> Path:
    """The job's run dir, ``hydra.sweep.dir/hydra.sweep.subdir``, as Hydra's run_job resolves it."""
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job_cfg)
    try:
        return Path(str(job_cfg.hydra.sweep.dir)) / str(OmegaConf.select(job_cfg, "hydra.sweep.subdir"))
    finally:
        if previous is not None:
            HydraConfig.instance().set_config(previous)


def compose_job(compose: Callable[[list[str]], DictConfig], overrides: list[str],
                describe: Callable[[BaseException], str]) -> PlannedJob:
    """Compose and validate one job (``compose``: the sweeper's config loader); an error is kept on the job."""
    job = PlannedJob(overrides, ",".join(o for o in overrides if o != MULTIRUN_JOB))
    try:
        full = compose(overrides)
        job.name = str(full.hydra.job.override_dirname) or job.name
        job.run_dir = run_dir_of(full)
        cfg = copy.copy(full)
        with open_dict(cfg):
            del cfg["hydra"]
        validate(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # noqa: BLE001 -- any error composing or validating one job is that job's error
        job.error = describe(e)
        return job
    job.cfg = cfg
    cell = cell_name(cfg)
    job.identity = run_identity(config, cell)
    job.coordinates = (cell, str(cfg.schedule.name), cfg.seed)
    return job


def mark_repeats(jobs: list[PlannedJob]) -> None:
    """A job computing what an earlier job of the sweep computes is skipped (``none`` under every schedule)."""
    first: dict[str, str] = {}
    for job in jobs:
        if job.error is not None:
            continue
        if job.identity in first:
            job.status = f"repeats {first[job.identity]}: skipped"
        else:
            first[job.identity] = job.name


def mark_states(jobs: list[PlannedJob]) -> None:
    """What launching each job would do in its run dir (RunDir.launch_state); its refusal is the job's error."""
    for job in jobs:
        if job.runs:
            try:
                job.status = RunDir(job.run_dir).launch_state(job.cfg)
            except ValueError as e:  # ConfigError: another config's run there, trainer.resume=never over a run
                job.error = " ".join(str(e).split())


def other_sweep(sweep_dir: Path, jobs: list[PlannedJob]) -> str | None:
    """The refusal when ``sweep_dir`` holds a completed run of one of the plan's (cell, schedule, seed) in another
    folder and with another config: another sweep's, which the report would mix with this one's. None if not."""
    planned: dict[tuple, list[PlannedJob]] = {}
    for job in jobs:
        if job.cfg is not None:
            planned.setdefault(job.coordinates, []).append(job)
    mine = {job.run_dir.resolve() for job in jobs if job.run_dir is not None}
    conflicts = []
    for path in sorted(sweep_dir.glob(f"*/{RESULTS}")):
        if path.parent.resolve() in mine:
            continue
        try:
            data = json.loads(path.read_text())
            config, cell = data["config"], data["cell"]
            if data.get("status") != "completed":
                continue
            alike = planned.get((cell, str(config["schedule"]["name"]), config.get("seed")), [])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a run this plan can be compared with (the report lists unreadable ones)
        theirs = experiment_config(config, cell)
        differences = []
        for job in alike:
            ours = experiment_config(OmegaConf.to_container(job.cfg, resolve=True), cell)
            keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            differences.append((path.parent.name, job.name, keys[0], theirs.get(keys[0]), ours.get(keys[0]))
                               if keys else None)
        if differences and None not in differences:  # a run of the same place in the tables, none of ours
            conflicts.append(differences[0])
    if not conflicts:
        return None
    there, here, key, old, new = conflicts[0]
    more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
    return (f"{sweep_dir} holds completed runs of another sweep: {there} differs from this sweep's {here} in "
            f"{key} ({old!r} there, {new!r} here){more}; give a new hydra.sweep.dir, or trainer.rerun=true to "
            "add this sweep's runs beside them")


def errors(jobs: list[PlannedJob]) -> list[str]:
    """One line per invalid job."""
    return [f"job {job.name or '(no overrides)'}: {job.error}" for job in jobs if job.error is not None]


def format_plan(jobs: list[PlannedJob], sweep_dir: Path, device: str) -> str:
    """The plan as a table: one row per job (overrides, run dir, status, estimated time) and the total."""
    rows = [(str(i), job.name or "(no overrides)", str(job.run_dir.relative_to(sweep_dir)) if job.run_dir else "-",
             job.error and f"invalid: {job.error}" or job.status, duration(job.seconds) if job.runs else "")
            for i, job in enumerate(jobs)]
    head = ("#", "overrides", "run dir", "status", "est. time")
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    widths[-2] = min(widths[-2], 60)  # the status column; a long error line stays on its row
    lines = ["  ".join(value.ljust(w) for value, w in zip(row, widths, strict=True)).rstrip()
             for row in [head, *rows]]
    to_run = [job for job in jobs if job.runs]
    known = [job.seconds for job in to_run if job.seconds is not None]
    total = sum(known) if len(known) == len(to_run) else None
    lines.append(f"{len(jobs)} jobs in {sweep_dir}: {len(to_run)} to run, {len(jobs) - len(to_run)} skipped or "
                 f"invalid; estimated {duration(total)} on {device} (one job at a time)")
    return "\n".join(lines)


@dataclass
class SweepProgress:
    """After each job of a sweep: jobs done of the plan's total and the sweep's ETA from the jobs finished so far
    (read from the planned run dirs' results.json, so it holds for launchers that run jobs in other processes)."""

    run_dirs: list[str]
    started: float = field(default_factory=time.time)

    def line(self) -> str:
        """``sweep: 5/16 jobs done (1 failed), 1m02s elapsed, ETA 2m10s``."""
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started))
        done = failed = 0
        for run_dir in self.run_dirs:
            try:
                data = json.loads((Path(run_dir) / RESULTS).read_text())
            except (OSError, ValueError):
                continue
            if data.get("status") in ("completed", "failed") and str(data.get("finished_at", "")) >= since:
                done += 1
                failed += data["status"] == "failed"
        elapsed = time.time() - self.started
        total = len(self.run_dirs)
        eta = elapsed / done * (total - done) if done else None
        failures = f" ({failed} failed)" if failed else ""
        return (f"sweep: {done}/{total} jobs done{failures}, {duration(elapsed)} elapsed, "
                f"ETA {duration(eta) if done < total else '0s'}")
