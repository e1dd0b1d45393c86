"""The golden regression record: two tiny fixed-seed runs on generated data, rerun by tests/test_golden.py.

This is the one place where expected numbers come from a run. It guards against *unrecorded* change, not
against error: `record.json` may change only together with a CHANGELOG.md "Numbers" entry and a version
bump. To regenerate it after such a change: ``python tests/golden/runs.py --write``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RECORD = Path(__file__).with_name("record.json")
THREADS = 2  # torch's intra-op threads when the record was made: fp32 sums can depend on the count
# Per-epoch keys that vary from run to run (wall-clock times); everything else in an entry is compared.
TIMING_KEYS = ("seconds", "data_seconds", "eval_seconds")
COMMON = [
    "model=deeplabv3plus_resnet18", "model.pretrained=none", "trainer=smoke", "data=synthetic",
    "data.synth.train=24", "data.synth.val=6", "data.synth.seed=0", "data.synth.min_side=40",
    "data.synth.max_side=56", "data.base_size=40", "data.crop_size=33", "trainer.batch_size=2",
    "trainer.val_batch_size=4", "seed=0",
]
RUNS = {
    "none": ["cell=none", "trainer.epochs=2"],
    "all-dropblock-linear": ["cell=all-dropblock", "schedule=linear", "schedule.ramp_epochs=2",
                             "dropout.block_size=3", "trainer.epochs=3"],
}


def cpu_capability() -> str:
    """The CPU kernels torch dispatches to here (AVX2, AVX512, ...): fp32 sums may round differently."""
    return torch.backends.cpu.get_cpu_capability()


def run(name: str, workdir: Path) -> dict:
    """Train golden run ``name`` through the command line in ``workdir``; its best epoch and metric history."""
    run_dir, data_root = workdir / name, workdir / "data"
    cmd = [sys.executable, "-m", "deeplab_dropout.train", *COMMON, *RUNS[name], f"data.root={data_root}",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(THREADS)}
    subprocess.run(cmd, check=True, cwd=workdir, env=env, capture_output=True, text=True)
    results = json.loads((run_dir / "results.json").read_text())
    history = [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in results["history"]]
    return {"overrides": RUNS[name], "status": results["status"], "best_epoch": results["best_epoch"],
            "history": history}


def make_record(version: str) -> dict:
    """Both golden runs, with the version and CPU capability that made them."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: run(name, Path(tmp)) for name in RUNS}
    return {"version": version, "cpu_capability": cpu_capability(), "torch": torch.__version__,
            "common_overrides": COMMON, "runs": runs}


def main() -> None:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {RECORD.name} (with a CHANGELOG entry)")
    args = parser.parse_args()
    record = make_record(version("deeplab-dropout"))
    text = json.dumps(record, indent=1) + "\n"
    if args.write:
        RECORD.write_text(text)
        print(f"wrote {RECORD}")
    else:
        print(text)


if __name__ == "__main__":
    main()
