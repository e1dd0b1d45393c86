"""The golden regression record (tests/golden/): two tiny fixed-seed runs must give the recorded numbers, and
the record may only change together with a CHANGELOG.md "Numbers" entry for its version.

Where this machine's CPU kernels (torch's cpu capability) are those that made the record, every number must
be equal; on another CPU family fp32 sums may round differently, so the comparison allows rounding-sized
differences (losses to 1e-3 relative, mIoU-type metrics to 5e-3 absolute) — far below what a change of
behaviour moves (a changed mask drawing moved the demo's all-chandrop per-image mean by 0.04).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from golden.runs import RECORD, RUNS, cpu_capability, run

REPO = Path(__file__).resolve().parents[1]
RECORDED = json.loads(RECORD.read_text())


def releases() -> dict[str, str]:
    """CHANGELOG.md's releases: version -> the text of its section."""
    text = (REPO / "CHANGELOG.md").read_text()
    parts = re.split(r"^## \[([^\]]+)\].*$", text, flags=re.M)
    return {version: body for version, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_the_record_is_of_the_runs_defined_here():
    assert set(RECORDED["runs"]) == set(RUNS)
    assert all(RECORDED["runs"][name]["overrides"] == RUNS[name] for name in RUNS)


def test_the_record_version_has_a_numbers_entry_and_the_package_follows_the_changelog():
    found = releases()
    assert RECORDED["version"] in found, f"CHANGELOG.md has no release {RECORDED['version']}"
    assert re.search(r"^### Numbers$", found[RECORDED["version"]], flags=re.M), (
        f"CHANGELOG.md's {RECORDED['version']} has no '### Numbers' section for the golden record")
    version = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), flags=re.M)[1]
    newest = next(v for v in found if v != "Unreleased")
    assert version == newest, f"pyproject.toml's version {version} is not CHANGELOG.md's newest release {newest}"


def close(new, old, path: str, exact: bool) -> list[str]:
    """The places where ``new`` differs from ``old`` (recursively), as 'path: old -> new'."""
    if isinstance(old, dict):  # every recorded number (a later version may record more)
        if not set(old) <= set(new):
            return [f"{path}: keys {sorted(set(old) - set(new))} no longer recorded"]
        return [d for k in old for d in close(new[k], old[k], f"{path}.{k}", exact)]
    if isinstance(old, list):
        if len(new) != len(old):
            return [f"{path}: length {len(old)} -> {len(new)}"]
        return [d for i, (n, o) in enumerate(zip(new, old, strict=True)) for d in close(n, o, f"{path}[{i}]", exact)]
    if isinstance(old, float) and isinstance(new, float) and not exact:
        loss = path.rsplit(".", 1)[-1].endswith("loss")
        ok = new == pytest.approx(old, rel=1e-3) if loss else new == pytest.approx(old, abs=5e-3)
        return [] if ok else [f"{path}: {old!r} -> {new!r}"]
    return [] if new == old else [f"{path}: {old!r} -> {new!r}"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run_gives_the_recorded_numbers(name, tmp_path):
    exact = cpu_capability() == RECORDED["cpu_capability"]
    got = run(name, tmp_path)
    diffs = close(got, RECORDED["runs"][name], name, exact)
    assert not diffs, ("numbers moved (a CHANGELOG 'Numbers' entry, a version bump and "
                       "`python tests/golden/runs.py --write` go together):\n" + "\n".join(diffs[:20]))
