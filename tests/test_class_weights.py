"""Issue 13 item 3: class weights from the training split's masks (cached), weighted CE and focal loss."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, tiny_cfg
from omegaconf import OmegaConf
from PIL import Image

from deeplab_dropout import train as train_mod
from deeplab_dropout.class_weights import (
    cached_counts,
    class_weights,
    counts_path,
    inverse_frequency,
    log_inverse_frequency,
    weights_from_counts,
)
from deeplab_dropout.config import ConfigError, validate
from deeplab_dropout.data import VOCSegmentation, get_datasets, make_split
from deeplab_dropout.data.split import ids_sha256
from deeplab_dropout.data.synth import generate
from deeplab_dropout.data.voc import voc_dir
from deeplab_dropout.eval import run_eval
from deeplab_dropout.loss import make_criterion, pixel_loss_sum, reduce_loss
from deeplab_dropout.rundir import RunDir

K = 21


def numpy_counts(root: Path, ids: list[str]) -> np.ndarray:
    """Pixels per class over the listed masks, one comparison per class (no bincount, no package reader)."""
    counts = np.zeros(K, dtype=np.int64)
    for i in ids:
        mask = np.array(Image.open(voc_dir(root) / "SegmentationClass" / f"{i}.png"))
        counts += [(mask == k).sum() for k in range(K)]
    return counts


def report_formulas(c: np.ndarray) -> dict[str, np.ndarray]:
    """The two formulas as written out (eq. 3 of the course report on frequencies f = c / Σc); classes without
    pixels take the largest weight of the present ones."""
    present = c > 0
    f = c / c.sum()
    inv = np.zeros(K)
    inv[present] = c.sum() / (K * c[present])
    log = np.zeros(K)
    log[present] = np.log(1.0 / f.max() * (f.sum() / f[present]))
    for w in (inv, log):
        w[~present] = w[present].max()
    return {"inverse_frequency": inv, "log_inverse_frequency": log}


@pytest.mark.parametrize("formula", ["inverse_frequency", "log_inverse_frequency"])
def test_weights_equal_a_recount_of_the_split_masks(voc_root, formula):
    cfg = tiny_cfg(voc_root, f"loss.class_weights={formula}")
    train_ds, _, split = get_datasets(cfg.data, seed=0)
    ids = json.loads(Path(split["manifest"]).read_text())["ids"]
    counts = numpy_counts(voc_root, ids)
    # The split, not the whole train list: otherwise the test could not tell them apart.
    assert not np.array_equal(counts, numpy_counts(voc_root, VOCSegmentation(voc_root, "train").ids))
    got = class_weights(cfg, train_ds, split["manifest"])
    np.testing.assert_allclose(got, report_formulas(counts)[formula], rtol=1e-12)
    assert class_weights(cfg) == got  # looked up from cfg.data alone (the eval app's way)


def test_formulas_on_constructed_counts():
    c = np.array([700, 200, 0, 100] + [0] * (K - 4))
    inv, log = inverse_frequency(c), log_inverse_frequency(c)
    assert inv[:4].tolist() == pytest.approx([1000 / (K * 700), 1000 / (K * 200), 1000 / (K * 100),
                                              1000 / (K * 100)])
    # log(1 / (f_max · f_i)) with f = (0.7, 0.2, -, 0.1): absent classes take the rarest class's weight.
    assert log[:4].tolist() == pytest.approx([-2 * np.log(0.7), -np.log(0.14), -np.log(0.07), -np.log(0.07)])
    assert np.isfinite(inv).all() and np.isfinite(log).all() and (log >= 0).all()
    # Scale-free: the same weights from counts times 1000 (e.g. each image repeated, or larger images).
    np.testing.assert_allclose(log_inverse_frequency(c * 1000), log)
    np.testing.assert_allclose(inverse_frequency(c * 1000), inv)


def test_single_class_and_empty_counts_are_refused():
    with pytest.raises(ValueError, match="all 0"):
        weights_from_counts([5] + [0] * (K - 1), "log_inverse_frequency")
    with pytest.raises(ValueError, match="positive total"):
        weights_from_counts([0] * K, "inverse_frequency")


def test_counts_cache_is_reused_and_follows_the_manifest(tmp_path):
    root = generate(tmp_path / "synth", n_train=12, n_val=2, seed=1, min_side=32, max_side=40)
    manifest, split = make_split(root, 0.5, 0)
    train_ds = VOCSegmentation(root, "train")
    first = cached_counts(manifest, train_ds, K)
    np.testing.assert_array_equal(first, numpy_counts(root, split["ids"]))
    cache = counts_path(manifest)
    assert cache.parent == manifest.parent and cache.name == f"{manifest.stem}.class_counts.json"
    # Reused: a planted count comes back as it is.
    saved = json.loads(cache.read_text())
    saved["counts"][0] += 12345
    cache.write_text(json.dumps(saved))
    assert cached_counts(manifest, train_ds, K)[0] == first[0] + 12345
    # Another manifest at the same path (new ids, new sha256): counted again, over the new ids.
    ids = train_ds.ids[:3]
    manifest.write_text(json.dumps({**split, "ids": ids, "sha256": ids_sha256(ids)}))
    np.testing.assert_array_equal(cached_counts(manifest, train_ds, K), numpy_counts(root, ids))
    assert json.loads(cache.read_text())["manifest_sha256"] == ids_sha256(ids)


def batch(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, K, 7, 9, generator=g)
    target = torch.randint(0, K, (n, 7, 9), generator=g)
    target[torch.rand(n, 7, 9, generator=g) < 0.3] = 255
    return logits, target


def weights(seed: int = 1) -> torch.Tensor:
    w = torch.rand(K, generator=torch.Generator().manual_seed(seed)) * 3
    w[4] = 0.0  # a zero weight is allowed: that class's pixels drop out of the loss
    return w


@pytest.mark.parametrize("batch_average", [False, True])
def test_weighted_loss_equals_cross_entropy_with_weight(batch_average):
    logits, target = batch()
    w = weights()
    loss = reduce_loss(*pixel_loss_sum(logits, target, 255, w), 3, OmegaConf.create({"batch_average": batch_average}))
    expected = F.cross_entropy(logits, target, weight=w, ignore_index=255)
    assert float(loss) == pytest.approx(float(expected / 3 if batch_average else expected), rel=1e-5)


def criterion(overrides: list[str], w: list[float] | None = None):
    cfg = compose_cfg(["loss=focal", *overrides])
    validate(cfg)
    return make_criterion(cfg, "cpu", w)


def numpy_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float, w: np.ndarray) -> float:
    """Σ w[y]·(−(1−p_t)^γ log p_t) / Σ w[y] over valid pixels, in float64 numpy."""
    z = logits.double().numpy().transpose(0, 2, 3, 1).reshape(-1, K)
    y = target.numpy().ravel()
    z, y = z[y != 255], y[y != 255]
    p = np.exp(z - z.max(1, keepdims=True))
    p_t = (p / p.sum(1, keepdims=True))[np.arange(len(y)), y]
    terms = -((1 - p_t) ** gamma) * np.log(p_t)
    return float((w[y] * terms).sum() / w[y].sum())


def mean_loss(crit, logits, target) -> float:
    return float(reduce_loss(*crit(logits, target), 1, OmegaConf.create({"batch_average": False})))


def test_focal_with_gamma_0_is_cross_entropy():
    logits, target = batch()
    w = weights()
    plain = F.cross_entropy(logits, target, ignore_index=255)
    weighted = F.cross_entropy(logits, target, weight=w, ignore_index=255)
    assert mean_loss(criterion(["loss.gamma=0"]), logits, target) == pytest.approx(float(plain), rel=1e-6)
    assert mean_loss(criterion(["loss.gamma=0"], w.tolist()), logits, target) == pytest.approx(float(weighted),
                                                                                                rel=1e-6)
    # The focal code path itself tends to CE as γ -> 0.
    s, n = pixel_loss_sum(logits, target, 255, w, gamma=1e-9)
    assert float(s / n) == pytest.approx(float(weighted), rel=1e-6)


@pytest.mark.parametrize(("gamma", "alpha", "weighted"), [(2.0, None, False), (2.0, 0.25, True), (0.5, 0.75, False)])
def test_focal_equals_the_formula(gamma, alpha, weighted):
    logits, target = batch(seed=2)
    w = weights() if weighted else torch.ones(K)
    # α: object classes α, background 1 − α, times the class weights.
    a = np.ones(K) if alpha is None else np.array([1 - alpha] + [alpha] * (K - 1))
    crit = criterion([f"loss.gamma={gamma}", f"loss.alpha={'null' if alpha is None else alpha}"],
                     w.tolist() if weighted else None)
    expected = numpy_focal(logits, target, gamma, w.double().numpy() * a)
    assert mean_loss(crit, logits, target) == pytest.approx(expected, rel=1e-5)
    assert mean_loss(crit, logits.to(torch.bfloat16), target) == pytest.approx(
        numpy_focal(logits.to(torch.bfloat16).float(), target, gamma, w.double().numpy() * a), rel=1e-5)


def test_focal_gradient_is_finite_where_the_model_is_certain():
    # p_t == 1 in fp32: a γ < 1 power has an infinite slope there.
    logits = torch.zeros(1, K, 2, 2)
    logits[:, 3] = 200.0
    logits.requires_grad_(True)
    target = torch.full((1, 2, 2), 3)
    for gamma in (0.5, 2.0):
        s, _ = pixel_loss_sum(logits, target, 255, None, gamma)
        (grad,) = torch.autograd.grad(s, logits)
        assert torch.isfinite(grad).all() and float(s.detach()) == 0.0


BAD = [
    (["loss.class_weights=[1,2]"], "loss.class_weights=[1, 2] is invalid: expected none, inverse_frequency, "
     "log_inverse_frequency or a list of model.num_classes=21 finite numbers >= 0, at least one > 0"),
    ([f"loss.class_weights=[{','.join(['0'] * K)}]"], "at least one > 0"),
    ([f"loss.class_weights=[-1{',1' * (K - 1)}]"], "finite numbers >= 0"),
    ([f"loss.class_weights=[inf{',1' * (K - 1)}]"], "finite numbers >= 0"),
    (["loss.class_weights=median_frequency"], "loss.class_weights='median_frequency' is invalid: expected one of "
     "none, inverse_frequency, log_inverse_frequency"),
    (["loss=focal", "loss.gamma=-1"], "loss.gamma=-1 is invalid: expected a number in [0, inf)"),
    (["loss=focal", "loss.alpha=1"], "loss.alpha=1 is invalid: expected a number in (0, 1)"),
    (["loss=focal", "loss.alpha=0"], "loss.alpha=0 is invalid: expected a number in (0, 1)"),
    (["loss.name=focal"], "loss.name='focal' is invalid: expected one of ce"),  # focal's keys come with loss=focal
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o)[:60] for o, _ in BAD])
def test_bad_loss_values_fail_in_one_line(compose_config, overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    assert "\n" not in str(info.value) and message in str(info.value)


def test_good_loss_values_pass(compose_config):
    for overrides in (["loss=focal"], ["loss=focal", "loss.alpha=0.25", "loss.gamma=0"],
                      [f"loss.class_weights=[0{',0.5' * (K - 1)}]"], ["loss.class_weights=log_inverse_frequency"]):
        validate(compose_config(overrides))


def test_focal_weighted_rotated_repeated_run_end_to_end(voc_root, tmp_path):
    cfg = tiny_cfg(voc_root, "loss=focal", "loss.class_weights=log_inverse_frequency",
                   "data.augment.rotation_degrees=10", "data.augment.repeats=2", "trainer.epochs=1",
                   "trainer.max_train_steps=2", "trainer.max_val_images=4")
    train_mod.run(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed"
    entry = results["history"][0]
    assert np.isfinite(entry["train_loss"]) and np.isfinite(entry["val_loss"])
    manifest = Path(results["split"]["manifest"])
    assert counts_path(manifest).is_file()
    state = train_mod.set_up(cfg, RunDir(tmp_path / "again"))
    assert len(state.train_ds) == 2 * results["split"]["n_images"]
    expected_w = torch.tensor(class_weights(cfg), dtype=torch.float32)
    assert torch.equal(state.criterion.weight, expected_w) and state.criterion.gamma == 2.0
    # The eval app's val loss is the training criterion's (class weights from the training split): the same
    # weighted focal loss, the same number from the same weights.
    overrides = [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}"]
    again = run_eval(compose_cfg(overrides, config_name="eval"), tmp_path / "eval", overrides)
    assert again["val_loss"] == pytest.approx(entry["val_loss"], rel=1e-5)
