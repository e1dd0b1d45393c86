"""scripts/bench.py: what it writes when run (the JSON record's documented keys, finite positive ratios, the
Markdown table, a failing section reported), its FLOP count against an analytic count of the conv layers, and
its pure helpers recomputed by hand. No timing is asserted."""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_cfg

from deeplab_dropout.model import build_model

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
_spec = importlib.util.spec_from_file_location("bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)

# A step config that takes seconds on 2 CPU cores.
TINY_STEP = ["--backbone", "resnet18", "--size", "65", "--batch", "2", "--repeats", "1", "--gemm", "256"]
STEP_RATIOS = {"ours_fp32_vs_gemm_fp32", "ours_auto_vs_gemm_auto", "ours_fp32_vs_limit_fp32",
               "ours_auto_vs_limit_auto", "ours_auto_vs_ours_fp32"}


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(_PATH), *args], cwd=tmp_path, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def spreads(obj) -> list[dict]:
    """Every spread (median/min/max/n) anywhere in a JSON record."""
    if isinstance(obj, dict):
        if {"median", "min", "max", "n"} <= obj.keys():
            return [obj]
        return [s for v in obj.values() for s in spreads(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in spreads(v)]
    return []


def assert_finite_positive_spreads(section: dict) -> None:
    found = spreads(section)
    assert found
    for s in found:
        assert all(math.isfinite(s[k]) and s[k] > 0 for k in ("median", "min", "max")), s
        assert s["min"] <= s["median"] <= s["max"] and s["n"] >= 1


@pytest.mark.slow
def test_quick_step_and_projection_write_the_record_and_the_markdown(tmp_path):
    out = tmp_path / "records"
    done = run_bench(tmp_path, "--quick", *TINY_STEP, "--skip", "eval,demo,reg,models", "--out", str(out))
    [record_path] = out.glob("*.json")
    assert [p.name for p in out.glob("*.md")] == [record_path.with_suffix(".md").name]
    rec = json.loads(record_path.read_text())
    # Named by date and machine: <date>-cpu-<model>-<cores>c-quick
    m = rec["machine"]
    assert record_path.name == f"{rec['date']}-cpu-{bench.slug(m['cpu'])}-{m['cores']}c-quick.json"
    assert {"cpu", "cores", "native_bf16_cpu", "gpu", "torch"} <= rec["machine"].keys()
    assert rec["machine"]["torch"] == torch.__version__ and rec["bench"]["quick"] is True
    assert {"step", "projection"} <= rec.keys()
    assert not {"eval_cache", "demo_epoch", "regularizers", "models"} & rec.keys()  # skipped
    step = rec["step"]
    assert STEP_RATIOS <= step["ratios"].keys()
    assert "torchvision_unavailable" in step  # torchvision has no deeplabv3_resnet18
    assert step["auto_precision"] in ("fp32", "bf16", "fp16")
    assert step["flops_per_step"]["ours_fp32"] > 1e9  # ResNet-18 DeepLabv3+, batch 2 × 65², fwd+bwd
    assert_finite_positive_spreads(step)
    proj = rec["projection"]
    for n in ("150", "250"):
        p = proj["n_train"][n]
        assert all(math.isfinite(p[k]) and p[k] > 0 for k in ("run_s", "study_s", "pflop_per_run"))
        assert p["study_s"] == pytest.approx(31 * p["run_s"])
    assert proj["n_train"]["250"]["run_s"] > proj["n_train"]["150"]["run_s"]
    md = record_path.with_suffix(".md").read_text()
    assert rec["date"] in md and rec["machine"]["cpu"] in md and f"torch {torch.__version__}" in md
    assert "| | quantity | value | config |" in md and "| (a) | train step fp32, images/s |" in md
    assert "| (f) | projected 31-run study |" in md
    assert "train step fp32, images/s" in done.stdout and str(record_path) in done.stdout


@pytest.mark.slow
def test_runner_sections_measure_through_the_runner_and_its_cli(tmp_path):
    # eval cache (d), the demo run (e) with the runner's profile split, malloc (i) in CLI children, (g), (h).
    json_path = tmp_path / "here" / "record.json"
    run_bench(tmp_path, *TINY_STEP, "--demo-epochs", "1", "--skip", "step,project", "--json", str(json_path))
    rec = json.loads(json_path.read_text())
    assert json_path.with_suffix(".md").exists()
    assert {"eval_cache", "demo_epoch", "malloc", "regularizers", "models"} <= rec.keys()
    for key in ("eval_cache", "demo_epoch", "malloc", "regularizers", "models"):
        assert "failed" not in rec[key]
        assert_finite_positive_spreads(rec[key])
    ev = rec["eval_cache"]
    assert ev["n_val"] == 48 and ev["wall_over_model"] >= 1.0 and ev["cache_bound"] >= 1.0
    demo = rec["demo_epoch"]
    [run] = demo["runs"]  # --repeats 1
    [epoch] = run["epochs"]  # --demo-epochs 1, with the runner's profile keys (trainer.profile=true)
    assert {"seconds", "data_seconds", "step_seconds", "eval_seconds", "bookkeeping_seconds"} == epoch.keys()
    # The parts of a run's time add up to its wall time.
    assert sum(demo["split_s"].values()) == pytest.approx(run["wall_s"])
    assert demo["train_wall_over_steps"] >= 1.0
    assert [len(v) for v in rec["malloc"]["run_seconds"].values()] == [1, 1]
    assert set(rec["regularizers"]["cell_vs_none"]) == {"all-chandrop", "all-dropblock", "all-uout"}
    assert set(rec["models"]["models"]) == {"deeplabv3plus", "fcn", "fpn", "unet"}


def test_a_failing_section_is_reported_and_the_record_still_written(tmp_path, capsys):
    status = bench.main(["--quick", *TINY_STEP, "--backbone", "resnet7", "--skip", "eval,demo,reg",
                         "--out", str(tmp_path)])
    assert status == 1
    [record_path] = tmp_path.glob("*.json")
    rec = json.loads(record_path.read_text())
    assert "resnet7" in rec["step"]["failed"] and "resnet7" in rec["models"]["failed"]
    assert "projection" not in rec  # nothing measured to project from
    assert "failed (ConfigError: model.backbone='resnet7'" in capsys.readouterr().out


def test_unknown_sections_to_skip_are_refused():
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--skip", "step,stpe"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------- FLOP count
def analytic_conv_flops(model: torch.nn.Module, images: torch.Tensor, backward: bool) -> int:
    """2·Cout·Cin/groups·kh·kw·Hout·Wout·N per Conv2d (and 2·in·out per row of any Linear), from forward hooks;
    with ``backward``, one more such term for the weight gradient and one for the input gradient where the
    input needs one (not the stem conv's, whose input is the image)."""
    total = [0]

    def conv_hook(m: torch.nn.Conv2d, args, out) -> None:
        kh, kw = m.kernel_size
        n, _, h, w = out.shape
        fwd = 2 * m.out_channels * (m.in_channels // m.groups) * kh * kw * h * w * n
        total[0] += fwd * (1 + (1 + args[0].requires_grad if backward else 0))

    def linear_hook(m: torch.nn.Linear, args, out) -> None:
        fwd = 2 * m.in_features * m.out_features * out.numel() // m.out_features
        total[0] += fwd * (1 + (1 + args[0].requires_grad if backward else 0))

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    out = model(images)
    if backward:
        out.sum().backward()
    for h in hooks:
        h.remove()
    return total[0]


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(compose_cfg(TINY))


def test_forward_flops_within_2_percent_of_the_conv_count(small_model):
    x = torch.randn(1, 3, 65, 65)  # eval: image pooling's BatchNorm takes a batch of one there
    flops = bench.count_flops(small_model.eval(), x)
    analytic = analytic_conv_flops(small_model.eval(), x, backward=False)
    assert analytic > 1e9  # a ResNet-18 DeepLabv3+ at 65² is a few GFLOP: the hooks saw the whole model
    assert abs(flops - analytic) / analytic < 0.02


def test_forward_backward_flops_within_2_percent_and_about_three_times_forward(small_model):
    x = torch.randn(2, 3, 65, 65)
    model = small_model.train()
    both = bench.count_flops(model, x, backward=True)
    analytic = analytic_conv_flops(model, x, backward=True)
    assert abs(both - analytic) / analytic < 0.02
    forward = analytic_conv_flops(model, x, backward=False)
    assert 2.8 < both / forward <= 3.0  # 3× but for the stem's input gradient, which nobody needs


def test_meta_device_count_equals_the_real_count(small_model):
    # The projection counts ResNet-101 at 513² on the meta device (nothing computed): same number.
    x = torch.randn(1, 3, 65, 65)
    real = bench.count_flops(small_model.eval(), x)
    with torch.device("meta"):
        meta_model = build_model(compose_cfg(TINY))
    assert bench.count_flops(meta_model.eval(), x.to("meta")) == real


# -------------------------------------------------------------------------------------------- pure helpers
def test_spread_is_median_min_max_and_count():
    assert bench.spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert bench.spread([0.9]) == {"median": 0.9, "min": 0.9, "max": 0.9, "n": 1}
    with pytest.raises(ValueError, match="no values"):
        bench.spread([])


def test_round_ratios_pair_rounds_and_refuse_unequal_series():
    assert bench.round_ratios([2.0, 9.0, 1.0], [1.0, 3.0, 4.0]) == [2.0, 3.0, 0.25]
    with pytest.raises(ValueError, match="3 and 2 rounds"):
        bench.round_ratios([1.0, 2.0, 3.0], [1.0, 2.0])


def test_projection_arithmetic_by_hand():
    p = bench.project(train_flops=3e12, val_flops=1e12, flops_per_s=2e12, n_train=200, n_val=1449, epochs=50,
                      runs=31, eval_overhead=1.5, train_overhead=1.2)
    train_s = 200 * 3 / 2 * 1.2       # 360 s: 200 images × 3 TFLOP at 2 TFLOP/s, × 1.2
    eval_s = 1449 * 1 / 2 * 1.5       # 1086.75 s
    assert p["train_s_per_epoch"] == pytest.approx(train_s)
    assert p["eval_s_per_epoch"] == pytest.approx(eval_s)
    assert p["run_s"] == pytest.approx(50 * (train_s + eval_s))
    assert p["study_s"] == pytest.approx(31 * 50 * (train_s + eval_s))
    assert p["pflop_per_run"] == pytest.approx(50 * (600 + 1449) / 1000)  # TFLOP → PFLOP, overheads excluded
    assert bench.project(1.0, 0.0, 1.0, 10)["run_s"] == pytest.approx(50 * 10)  # defaults: 50 epochs, no overhead
    slower_eval = bench.project(3e12, 1e12, 2e12, 200, eval_overhead=1.5, train_overhead=1.2, eval_flops_per_s=1e12)
    assert slower_eval["eval_s_per_epoch"] == pytest.approx(2 * eval_s)  # eval at half the rate
    assert slower_eval["train_s_per_epoch"] == pytest.approx(train_s)


def test_cache_bound_by_hand():
    # 3 ms to decode an image, 400 images/s (2.5 ms) evaluated from the cache: (3 + 2.5) / 2.5.
    assert bench.cache_bound(0.003, 400.0) == pytest.approx(2.2)
    assert bench.cache_bound(0.0, 50.0) == pytest.approx(1.0)  # nothing to decode: nothing to gain


def test_demo_summary_by_hand():
    def epoch(seconds, data, step, ev, book):
        return {"seconds": seconds, "data_seconds": data, "step_seconds": step, "eval_seconds": ev,
                "bookkeeping_seconds": book}

    runs = [{"wall_s": 12.0, "epochs": [epoch(5.0, 1.0, 3.0, 0.5, 0.5), epoch(6.0, 1.0, 3.5, 1.0, 0.5)]},
            {"wall_s": 10.0, "epochs": [epoch(4.5, 0.5, 3.0, 0.5, 0.5), epoch(4.5, 0.5, 3.0, 0.5, 0.5)]}]
    out = bench.demo_summary(runs)
    # Run 1: 12 s over steps 6.5 + eval 1.5 = 8; run 2: 10 s over 6 + 1 = 7. 1 s of each outside its epochs.
    assert out["wall_over_steps_and_eval"] == bench.spread([1.5, 10 / 7])
    assert out["first_run_wall_over_steps_and_eval"] == 1.5
    assert out["per_epoch_wall_over_steps_and_eval"] == bench.spread([5 / 3.5, 6 / 4.5, 4.5 / 3.5, 4.5 / 3.5])
    assert out["split_s"] == pytest.approx({"data": 1.5, "steps": 6.25, "eval": 1.25, "bookkeeping": 1.0,
                                            "outside_epochs": 1.0})
    assert sum(out["split_s"].values()) == pytest.approx(statistics.mean(out["run_wall_s"]))
    assert out["train_wall_over_steps"] == pytest.approx((1.5 + 6.25) / 6.25)
    assert out["eval_wall_s"] == pytest.approx(1.25)


@pytest.mark.parametrize(("seconds", "text"), [(42.0, "42.0 s"), (90.0, "1.5 min"), (7200.0, "2.0 h"),
                                               (3 * 86400.0, "3.0 d")])
def test_fmt_seconds(seconds, text):
    assert bench.fmt_seconds(seconds) == text


@pytest.mark.parametrize(("name", "expected"), [
    ("AMD EPYC", "amd-epyc"), ("AMD EPYC 7B13 64-Core Processor", "amd-epyc-7b13"),
    ("Intel(R) Xeon(R) CPU @ 2.20GHz", "intel-xeon"), ("NVIDIA H200", "nvidia-h200"), ("", "unknown")])
def test_machine_names_in_file_names(name, expected):
    assert bench.slug(name) == expected


def test_record_name_is_date_then_the_device_measured():
    info = {"cpu": "AMD EPYC", "cores": 2, "gpu": "NVIDIA H200"}
    assert bench.record_name(info, "cpu", "2026-12-03", quick=False) == "2026-12-03-cpu-amd-epyc-2c"
    assert bench.record_name(info, "cuda", "2026-12-03", quick=True) == "2026-12-03-cuda-nvidia-h200-quick"
