"""scripts/bench.py: its FLOP count against an analytic count of the conv layers, and its pure helpers (the
ratio/spread formatting and the projection arithmetic, recomputed by hand). Nothing here is timed."""
from __future__ import annotations

import importlib.util
import sys
import types
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


def test_spread_and_its_formatting():
    s = bench.spread([3.0, 1.0, 2.0, 10.0])
    assert s == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert bench.fmt_spread(s) == "2.50× (1.00–10.00, n=4)"
    assert bench.fmt_spread(bench.spread([0.9]), unit="", digits=1) == "0.9 (0.9–0.9, n=1)"
    assert bench.scaled(s, 0.5) == {"median": 1.25, "min": 0.5, "max": 5.0, "n": 4}
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


@pytest.mark.parametrize(("seconds", "text"), [(42.0, "42.0 s"), (90.0, "1.5 min"), (7200.0, "2.0 h"),
                                               (3 * 86400.0, "3.0 d")])
def test_fmt_seconds(seconds, text):
    assert bench.fmt_seconds(seconds) == text


def test_interleaved_calls_one_of_each_per_round_after_one_warm_up():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench.interleaved(fns, torch.device("cpu"), repeats=3)
    assert calls == ["a", "b"] * 4  # warm-up, then 3 rounds a, b, a, b, ...
    assert [len(t) for t in times.values()] == [3, 3]
    calls.clear()
    bench.interleaved(fns, torch.device("cpu"), repeats=2, warm=False)
    assert calls == ["a", "b"] * 2


def test_malloc_section_alternates_fresh_processes_and_pairs_rounds(monkeypatch, tmp_path):
    order = []

    def probe(tuned: bool, root, work) -> float:
        order.append(tuned)
        return 0.1 if tuned else 0.1 + 0.01 * len(order)

    monkeypatch.setattr(bench, "probe_in_child", probe)
    table = bench.Table(record={})
    out = bench.malloc_section(bench.Bench("resnet50", 129, 2, "cpu", 3, 64, False), tmp_path, tmp_path, table)
    assert order == [False, True, True, False, False, True]  # the order alternates round by round
    # rounds pair the i-th default with the i-th tuned: defaults 0.11, 0.14, 0.15 over 0.1
    assert out["default_vs_tuned"]["median"] == pytest.approx(1.4)
    assert out["default_vs_tuned"]["min"] == pytest.approx(1.1) and out["default_vs_tuned"]["max"] == pytest.approx(1.5)
    assert "(i)" in table.render()


def test_phase_timers_wrap_module_globals_and_restore_them():
    def work(x):
        return x + 1

    module = types.SimpleNamespace(work=work)
    with bench.phase_timers(module, ("work",), torch.device("cpu")) as seconds:
        assert module.work is not work
        assert module.work(1) == 2
    assert module.work is work
    assert set(seconds) == {"work"} and seconds["work"] >= 0.0


def test_model_timer_counts_only_the_chosen_mode():
    model = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 16, 16)
    with bench.model_timer(model.train(), torch.device("cpu"), in_training=False) as inside:
        model(x)
    assert inside == [0.0]
    with bench.model_timer(model.eval(), torch.device("cpu"), in_training=False) as inside:
        model(x)
    assert inside[0] > 0.0
    assert not model._forward_hooks and not model._forward_pre_hooks  # removed on exit


def test_bench_defaults_by_device_and_mode_and_explicit_options_win():
    quick = bench.make_bench(bench.parse_args(["--quick"]))
    assert (quick.backbone, quick.size, quick.batch, quick.repeats, quick.quick) == ("resnet50", 129, 2, 3, True)
    full = bench.make_bench(bench.parse_args([]))
    assert (full.backbone, full.size, full.batch, full.repeats) == ("resnet101", 321, 2, 5)
    cuda = bench.make_bench(bench.parse_args(["--device", "cuda"]))
    assert (cuda.size, cuda.batch) == (513, 8)
    mine = bench.make_bench(bench.parse_args(["--quick", "--backbone", "resnet18", "--size", "65", "--repeats", "7"]))
    assert (mine.backbone, mine.size, mine.repeats) == ("resnet18", 65, 7)
    assert mine.describe() == "resnet18 OS16 DeepLabv3+, batch 2 × 65², cpu"


def test_table_renders_aligned_columns():
    table = bench.Table()
    table.add("(a)", "short", "1.00× (0.90–1.10, n=5)", "cfg")
    table.add("(bb)", "a longer quantity", "2", "")
    table.add("(c)", "same config twice", "3", "cfg2")
    table.add("(c)", "same config again", "4", "cfg2")
    lines = table.render().splitlines()
    assert len(lines) == 5
    assert lines[3].endswith("cfg2") and lines[4].endswith("4")  # a repeated config is printed once
    starts = {line.index(v) for line, v in zip(lines[:3], ("quantity", "short", "a longer"), strict=True)}
    assert len(starts) == 1  # the quantity column starts at the same place on every line
    assert lines[2].endswith("2")  # trailing blanks of an empty config stripped


def test_guarded_turns_a_failing_section_into_a_row_and_passes_results_through():
    table = bench.Table()
    assert bench.guarded("(x)", table, lambda: {"a": 1}) == {"a": 1}
    assert table.rows == []

    def broken() -> dict:
        raise KeyError("data.val_cache")

    record = bench.guarded("(d)", table, broken)
    assert record == {"unavailable": "KeyError: 'data.val_cache'"}
    assert table.rows == [("(d)", "section", "unavailable (KeyError: 'data.val_cache')", "")]


def test_demo_rows_aggregate_runs_by_hand():
    # Per epoch [wall, train_step, train loop, evaluate, eval forwards]; two runs of two epochs.
    runs = [[[10.0, 6.0, 7.0, 2.0, 1.0], [12.0, 6.0, 8.0, 2.0, 2.0]],   # 22 s over 15 s in the model: 22/15
            [[9.0, 5.0, 6.0, 2.0, 1.0], [9.0, 5.0, 6.0, 2.0, 1.0]]]     # 18 s over 12 s: 1.5
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(backbone="resnet18"),
                                data=types.SimpleNamespace(crop_size=65), trainer=types.SimpleNamespace(batch_size=8))
    state = types.SimpleNamespace(train_ds=[0] * 44, val_ds=[0] * 24)
    table = bench.Table(record={})
    out = bench.add_demo_rows(cfg, state, runs, table)
    assert out["wall_over_model"] == bench.spread([22 / 15, 1.5])
    assert out["first_run_wall_over_model"] == 22 / 15
    assert out["per_epoch_wall_over_model"] == bench.spread([10 / 7, 12 / 8, 9 / 6, 9 / 6])
    assert out["run_wall_s"] == [22.0, 18.0]
    assert out["train_wall_over_steps"] == pytest.approx((15 + 12) / (12 + 10))  # loops ÷ steps, per-run means
    assert out["eval_wall_s"] == pytest.approx(4.0) and out["record_s"] == pytest.approx(20 - 13.5 - 4)
    assert "2 runs in one process" in out["config"] and len(table.rows) == 5


def test_cache_bound_by_hand():
    # 3 ms to decode an image, 400 images/s (2.5 ms) evaluated from the cache: (3 + 2.5) / 2.5.
    assert bench.cache_bound(0.003, 400.0) == pytest.approx(2.2)
    assert bench.cache_bound(0.0, 50.0) == pytest.approx(1.0)  # nothing to decode: nothing to gain


def test_eval_rows_say_why_a_ratio_is_missing_beside_the_cache_bound():
    ips = {"median": 400.0, "min": 390.0, "max": 410.0, "n": 3}
    base = {"config": "demo", "n_val": 10, "loader_build_s": {"ram": 0.03}, "wall_over_model": 1.1,
            "cache_bound": 2.2}
    without_off = bench.Table(record={})  # val_cache=off failed: the cache alone, no ratio
    bench.add_eval_rows({**base, "images_per_s": {"ram": ips}, "unavailable_off": "KeyError: x"}, without_off)
    quantities = [row[1] for row in without_off.rows]
    assert "cached vs uncached eval" in quantities and "  the most a cache can gain here" in quantities
    both = bench.Table(record={})
    bench.add_eval_rows({**base, "images_per_s": {"ram": ips, "off": ips}, "ram_vs_off": ips}, both)
    quantities = [row[1] for row in both.rows]
    assert "cached ÷ uncached eval speed" in quantities and "cached vs uncached eval" not in quantities
    [bound] = [row[2] for row in both.rows if row[1] == "  the most a cache can gain here"]
    assert bound == "2.20× (decode 3.0 ms + cached eval 2.5 ms an image)"
