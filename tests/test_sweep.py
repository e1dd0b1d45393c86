"""The study sweeper: Hydra's cartesian product, minus jobs that would repeat an earlier job's run."""
from __future__ import annotations

import itertools
import sys

import pytest
from conftest import compose_cfg
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from deeplab_dropout.study import CELLS, cell_name
from deeplab_dropout.sweep import JobExited, SweepTask, drop_repeats, failure, failure_report, run_identity


def identities(jobs: list[list[str]]) -> list[str]:
    out = []
    for overrides in jobs:
        cfg = compose_cfg(overrides)
        out.append(run_identity(OmegaConf.to_container(cfg, resolve=True), cell_name(cfg)))
    return out


def test_paper_matrix_trains_none_once():
    jobs = [[f"cell={c}", f"schedule={s}"] for c, s in itertools.product(CELLS, ("constant", "linear"))]
    kept = drop_repeats(jobs, identities(jobs), {})
    assert len(jobs) == 32 and len(kept) == 31
    assert [j for j in jobs if j not in kept] == [["cell=none", "schedule=linear"]]


def test_distinct_runs_are_all_kept():
    # Seeds, p and the ramp length all change what a regularised run computes.
    jobs = [["cell=spp-uout", f"dropout.p={p}", f"seed={s}", f"schedule.ramp_epochs={r}", "schedule=linear"]
            for p, s, r in itertools.product((0.1, 0.2), (0, 1), (10, 30))]
    assert drop_repeats(jobs, identities(jobs), {}) == jobs


def test_unregularised_runs_repeat_whatever_their_schedule_or_p():
    jobs = [["cell=none", "seed=1"], ["cell=none", "seed=1", "schedule=linear", "dropout.p=0.5"],
            ["cell=none", "seed=2"], ["dropout=channel", "placement=none", "seed=1"]]
    seen: dict[str, str] = {}
    assert drop_repeats(jobs, identities(jobs), seen) == [jobs[0], jobs[2]]
    # Later batches of the same sweep are checked against the earlier ones.
    assert drop_repeats([["cell=none", "seed=2", "schedule=linear"]],
                        identities([["cell=none", "seed=2", "schedule=linear"]]), seen) == []


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
