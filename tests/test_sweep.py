"""The study sweeper's jobs: Hydra's cartesian product, planned (validated, repeats of an earlier job's run
skipped), each job failing alone."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR
from hydra import compose as compose_config
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from deeplab_dropout.cli import describe
from deeplab_dropout.plan import MULTIRUN_JOB, PlannedJob, compose_job, errors, job_overrides, mark_repeats
from deeplab_dropout.study import CELLS
from deeplab_dropout.sweep import JobExited, SweepTask, failure, failure_report


def planned(jobs: list[list[str]], tmp_path: Path) -> list[PlannedJob]:
    """The plan's view of ``jobs``: each composed (as the sweeper does, with the hydra node) and validated."""
    def compose(overrides: list[str]):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose_config("train", overrides=[*overrides, f"hydra.sweep.dir={tmp_path}"],
                                  return_hydra_config=True)

    out = [compose_job(compose, job_overrides(overrides), describe) for overrides in jobs]
    mark_repeats(out)
    return out


def kept(jobs: list[PlannedJob]) -> list[list[str]]:
    return [[o for o in job.overrides if o != MULTIRUN_JOB] for job in jobs if job.runs]


def test_paper_matrix_trains_none_once(tmp_path):
    jobs = [[f"cell={c}", f"schedule={s}"] for c, s in itertools.product(CELLS, ("constant", "linear"))]
    plan = planned(jobs, tmp_path)
    assert len(jobs) == 32 and len(kept(plan)) == 31
    assert [j for j in jobs if j not in kept(plan)] == [["cell=none", "schedule=linear"]]
    repeat = next(job for job in plan if not job.runs)
    assert repeat.status == "repeats cell=none,schedule=constant: skipped"
    assert repeat.run_dir == tmp_path / "cell=none,schedule=linear"


def test_distinct_runs_are_all_kept(tmp_path):
    # Seeds, p and the ramp length all change what a regularised run computes.
    jobs = [["cell=spp-uout", f"dropout.p={p}", f"seed={s}", f"schedule.ramp_epochs={r}", "schedule=linear"]
            for p, s, r in itertools.product((0.1, 0.2), (0, 1), (10, 30))]
    assert kept(planned(jobs, tmp_path)) == jobs


def test_unregularised_runs_repeat_whatever_their_schedule_or_p(tmp_path):
    jobs = [["cell=none", "seed=1"], ["cell=none", "seed=1", "schedule=linear", "dropout.p=0.5"],
            ["cell=none", "seed=2"], ["dropout=channel", "placement=none", "seed=1"],
            ["cell=none", "seed=2", "schedule=linear"]]
    assert kept(planned(jobs, tmp_path)) == [jobs[0], jobs[2]]


def test_an_invalid_job_is_named_with_its_error_and_a_composition_error_too(tmp_path):
    plan = planned([["cell=spp-uout", "dropout.p=0.1"], ["cell=spp-uout", "dropout.p=2"], ["cell=al-uout"]],
                   tmp_path)
    lines = errors(plan)
    assert len(lines) == 2
    assert lines[0] == "job cell=spp-uout,dropout.p=2: dropout.p=2 is invalid: expected a number in [0, 1)"
    assert lines[1].startswith("job cell=al-uout: cell=al-uout is not an option of group cell")
    assert plan[0].error is None and plan[0].runs


def job_return(status: JobStatus, value, override_dirname: str) -> JobReturn:
    ret = JobReturn(overrides=override_dirname.split(","), status=status)
    ret.hydra_cfg = OmegaConf.create({"hydra": {"job": {"override_dirname": override_dirname}}})
    ret._return_value = value
    return ret


def test_failed_jobs_are_listed_one_line_each():
    jobs = [job_return(JobStatus.COMPLETED, 0.5, "cell=spp-uout,dropout.p=0.1"),
            job_return(JobStatus.FAILED, ValueError("Traceback (most recent call last):\n  ...\n"
                                                    "ValueError: dropout.p=1.5 is invalid"),
                       "cell=spp-uout,dropout.p=1.5")]
    failures = [line for line in map(failure, jobs) if line is not None]
    assert failure_report(failures, len(jobs)).splitlines() == [
        "failed: 1 of 2 runs:", "  cell=spp-uout,dropout.p=1.5: dropout.p=1.5 is invalid"]


def test_a_job_calling_sys_exit_fails_alone():
    def task(cfg):
        sys.exit(cfg["code"])

    with pytest.raises(JobExited, match="exited with status 2"):
        SweepTask(task)({"code": 2})  # outside a multirun: no GPU is claimed
    with pytest.raises(SystemExit):
        SweepTask(task)({"code": 0})  # a clean exit stays one
