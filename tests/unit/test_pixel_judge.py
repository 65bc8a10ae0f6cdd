"""The second digits judge (RBF SVM on 8x8 pooled pixels) and the goal under both judges."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distillkit.data.digits import DigitsSplit, digits_to_images, load_digits_split
from distillkit.evaluation.judge import DigitJudge
from distillkit.evaluation.metrics import digits_scores, per_class_accuracy
from distillkit.evaluation.pixel_judge import (
    PixelJudge,
    pixel_scores,
    pooled_pixels,
    train_pixel_judge,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def pixel_judge(split: DigitsSplit) -> PixelJudge:
    return train_pixel_judge(split)


@pytest.fixture(scope="module")
def cnn_judge(digits_judge) -> DigitJudge:
    return digits_judge[0]


def test_pooled_pixels_read_ink_where_it_is() -> None:
    """Background (-1) is 0, ink (+1) is 1, and a 4x4 block at 32 px is one 8x8 pixel."""
    x = -torch.ones(2, 3, 32, 32)
    x[1, :, 0:4, 28:32] = 1.0
    feats = pooled_pixels(x)
    assert feats.shape == (2, 64) and feats.dtype == np.float64
    assert np.all(feats[0] == 0.0)
    expected = np.zeros(64)
    expected[7] = 1.0  # row 0, column 7
    np.testing.assert_array_equal(feats[1], expected)
    grey64 = torch.nn.functional.interpolate(x[:, :1], scale_factor=2, mode="nearest")
    grey = pooled_pixels(grey64)  # 64 px grey: the same 8x8 reading
    np.testing.assert_array_equal(grey, feats)


def test_pooled_pixels_recover_the_scans() -> None:
    """The benchmark's 32 px images area-pooled back to 8x8 stay close to their own scans
    (bilinear upsampling blurs them a little), far closer than to another digit's scan."""
    from sklearn.datasets import load_digits

    scans = load_digits().images[:50]
    raw = scans / 16.0
    back = pooled_pixels(digits_to_images(scans)).reshape(-1, 8, 8)
    own = np.abs(back - raw).mean()
    other = np.abs(back - np.roll(raw, 1, axis=0)).mean()
    assert own < 0.08 and other > 3 * own


def test_pixel_judge_reads_held_out_digits_and_is_deterministic(
    split: DigitsSplit, pixel_judge: PixelJudge
) -> None:
    preds = pixel_judge.predict(split.heldout_images)
    assert (preds == split.heldout_labels.numpy()).mean() >= 0.97
    again = train_pixel_judge(split).predict(split.heldout_images)
    np.testing.assert_array_equal(preds, again)


def test_pixel_scores_separate_real_from_noise(split: DigitsSplit, pixel_judge: PixelJudge) -> None:
    real = pixel_scores(
        split.train_images[:500], split.train_labels[:500], pixel_judge, split.heldout_images
    )
    noise_images = torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = pixel_scores(noise_images, split.train_labels[:500], pixel_judge, split.heldout_images)
    assert real["accuracy"] >= 0.97 and noise["accuracy"] < 0.3
    assert noise["fd"] > 10 * real["fd"]


def test_a_lost_digit_shows_in_both_judges_per_class(
    split: DigitsSplit, pixel_judge: PixelJudge, cnn_judge: DigitJudge
) -> None:
    """A 'student' that draws a one whenever asked for a seven: 0 on class 7, the rest high."""
    images, labels = split.heldout_images.clone(), split.heldout_labels.clone()
    ones = images[labels == 1]
    sevens = (labels == 7).nonzero().flatten()
    images[sevens] = ones[torch.arange(len(sevens)) % len(ones)]
    px = pixel_scores(images, labels, pixel_judge, split.heldout_images)
    cnn = digits_scores(images, labels, cnn_judge, split.heldout_images)
    for per_class in (px["per_class"], cnn["per_class"]):
        assert per_class[7] == 0.0
        assert min(v for c, v in enumerate(per_class) if c != 7) >= 0.9
    assert per_class_accuracy(np.array([1, 1]), np.array([1, 2]))[:3] == [None, 1.0, 0.0]


def _bench_quality():
    spec = importlib.util.spec_from_file_location(
        "bench_quality", ROOT / "evaluation" / "bench_quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_goal_holds_under_both_judges() -> None:
    """A row the CNN judge passes fails on the pixel judge's accuracy or FD, and says which."""
    bench = _bench_quality()
    teacher = {"accuracy": 0.95, "fd": 3.0, "pixel": {"accuracy": 0.95, "fd": 0.2}}
    good = {"accuracy": 0.94, "fd": 3.5, "pixel": {"accuracy": 0.93, "fd": 0.24}}
    assert bench.goal_verdict(good, teacher) == (True, "pass")
    low = {**good, "pixel": {"accuracy": 0.914, "fd": 0.24}}
    ok, text = bench.goal_verdict(low, teacher)
    assert not ok and "px acc 0.914 < 0.920" in text and "px FD" not in text
    blurry = {**good, "pixel": {"accuracy": 0.95, "fd": 0.26}}
    ok, text = bench.goal_verdict(blurry, teacher)
    assert not ok and "px FD 0.26 > 0.25" in text
    cnn_only = {"accuracy": 0.94, "fd": 3.5}  # older rows without pixel scores: CNN goal only
    assert bench.goal_verdict(cnn_only, teacher)[0]


def _time_to_goal_bench():
    path = ROOT / "evaluation" / "bench_time_to_goal.py"
    spec = importlib.util.spec_from_file_location("bench_time_to_goal", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_time_to_goal_takes_the_first_meeting_less_evaluation_time() -> None:
    """evaluation/bench_time_to_goal.py: the first row passing both judges; its wall time is
    time since launch minus every evaluation's own seconds so far."""
    bench = _time_to_goal_bench()
    ref = {"accuracy": 0.95, "fd": 3.0, "pixel": {"accuracy": 0.95, "fd": 0.2}}
    row = {"accuracy": 0.94, "fd": 3.5, "px_accuracy": 0.93, "px_fd": 0.24, "seconds": 5.0}
    rows = [
        {**row, "step": 100, "time": 110.0, "px_fd": 0.3},  # CNN passes, pixel FD misses
        {**row, "step": 200, "time": 130.0},
        {**row, "step": 300, "time": 150.0},
    ]
    met = bench.first_meeting(rows, ref, launched=100.0)
    assert met["step"] == 200 and met["seconds"] == 130.0 - 100.0 - 10.0
    assert bench.first_meeting(rows[:1], ref, launched=100.0) is None


def test_time_to_goal_rerun_keeps_the_other_recipes_rows(tmp_path) -> None:
    """Rerunning one recipe keeps the others' rows with the commit they ran at; another
    family's file or --fresh starts over."""
    bench = _time_to_goal_bench()
    out = tmp_path / "ttg.json"
    rows = [{"recipe": "dmd2"}, {"recipe": "apt", "commit": "new"}]
    out.write_text(json.dumps({"commit": "old", "protocol": {"family": "sd15"}, "recipes": rows}))
    args = bench.parse_args(["--recipes", "apt", "--out", str(out)])
    assert bench.kept_rows(args) == [{"recipe": "dmd2", "commit": "old"}]
    assert (
        bench.kept_rows(bench.parse_args(["--recipes", "apt", "--out", str(out), "--fresh"])) == []
    )
    assert bench.kept_rows(bench.parse_args(["--family", "sdxl", "--out", str(out)])) == []
