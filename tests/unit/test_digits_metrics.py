"""Digits benchmark: split, prompts, judge and metrics checked against known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

import distillkit.evaluation.judge as judge_module
from distillkit.data.digits import (
    DIGIT_NAMES,
    PROMPT_TEMPLATES,
    DigitsSplit,
    eval_prompts,
    label_from_prompt,
    load_digits_split,
    prompt_for,
)
from distillkit.evaluation.judge import (
    DigitJudge,
    judge_accuracy,
    load_or_train_judge,
    train_judge,
)
from distillkit.evaluation.metrics import (
    digits_scores,
    diversity,
    feature_stats,
    frechet_distance,
    judge_outputs,
)


@pytest.fixture(scope="session")
def split() -> DigitsSplit:
    return load_digits_split(seed=0)


@pytest.fixture(scope="session")
def judge_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("judge_cache")


@pytest.fixture(scope="session")
def judge(split: DigitsSplit, judge_cache: Path) -> DigitJudge:
    return load_or_train_judge(judge_cache, seed=0, split=split)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --- Fréchet distance -------------------------------------------------------------------------


def test_fd_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fd_non_diagonal_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(1)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # Symmetric in its arguments, and accepts torch tensors.
    t = [torch.as_tensor(v) for v in (mu2, s2, mu1, s1)]
    assert frechet_distance(*t) == pytest.approx(expected, rel=1e-8)


def test_fd_singular_covariances_are_finite() -> None:
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))  # rank 4 in 20 dims
    fd = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert np.isfinite(fd) and fd > 0


def test_fd_of_sample_set_with_itself_is_zero() -> None:
    f = np.random.default_rng(3).normal(size=(500, 32))
    mu, sigma = feature_stats(f)
    assert mu.dtype == np.float64 and sigma.shape == (32, 32)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_shifted_gaussian_samples_approaches_mean_gap() -> None:
    rng = np.random.default_rng(4)
    d, n = 4, 40_000
    m = np.array([1.0, -2.0, 0.5, 0.0])
    fd = frechet_distance(
        *feature_stats(rng.normal(size=(n, d))), *feature_stats(rng.normal(size=(n, d)) + m)
    )
    assert fd == pytest.approx(float(m @ m), abs=0.05)


# --- diversity --------------------------------------------------------------------------------


def test_collapsed_samples_have_no_diversity() -> None:
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 16))
    collapsed = np.repeat(real[:1], 300, axis=0)
    div = diversity(collapsed, real)
    assert div["mean_pairwise_ratio"] == pytest.approx(0.0, abs=1e-12)
    assert div["recall"] < 0.05
    assert div["precision"] == 1.0  # the one image it repeats is real


def test_real_vs_real_has_high_recall_and_precision() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    div = diversity(a, b)
    assert div["recall"] > 0.8 and div["precision"] > 0.8
    assert div["mean_pairwise_ratio"] == pytest.approx(1.0, abs=0.05)


# --- split and prompts ------------------------------------------------------------------------


def test_split_is_stratified_and_deterministic(split: DigitsSplit) -> None:
    assert split.seed == 0
    n_train, n_held = len(split.train_labels), len(split.heldout_labels)
    assert n_train + n_held == 1797 and abs(n_held / 1797 - 0.25) < 0.01
    assert split.train_images.shape == (n_train, 3, 32, 32)
    assert split.heldout_images.dtype == torch.float32
    assert split.train_images.min() >= -1.0 and split.train_images.max() <= 1.0
    assert torch.equal(split.train_images[:, 0], split.train_images[:, 2])
    share_train = torch.bincount(split.train_labels, minlength=10) / n_train
    share_held = torch.bincount(split.heldout_labels, minlength=10) / n_held
    assert (share_train - share_held).abs().max() < 0.01
    again = load_digits_split(seed=0)
    assert torch.equal(again.heldout_images, split.heldout_images)
    assert torch.equal(again.train_labels, split.train_labels)
    other = load_digits_split(seed=1)
    assert not torch.equal(other.heldout_images, split.heldout_images)


def test_prompt_label_round_trip() -> None:
    for t in range(len(PROMPT_TEMPLATES)):
        for label, name in enumerate(DIGIT_NAMES):
            prompt = prompt_for(label, t)
            assert name in prompt
            assert label_from_prompt(prompt) == label
    for bad in ("a photo of a cat", "one or two", ""):
        with pytest.raises(ValueError):
            label_from_prompt(bad)
    with pytest.raises(ValueError):
        prompt_for(10)


def test_eval_prompts_fixed_and_balanced() -> None:
    prompts = eval_prompts(per_class=8)
    assert prompts == eval_prompts(per_class=8)
    assert len(prompts) == 80
    assert np.bincount([lab for _, lab in prompts]).tolist() == [8] * 10
    assert all(label_from_prompt(p) == lab for p, lab in prompts)
    assert len({p for p, _ in prompts}) == 10 * len(PROMPT_TEMPLATES)


# --- judge and end-to-end scores --------------------------------------------------------------


def test_judge_is_accurate_on_heldout_digits(judge: DigitJudge, split: DigitsSplit) -> None:
    assert judge_accuracy(judge, split.heldout_images, split.heldout_labels) >= 0.97
    feats, _ = judge_outputs(judge, split.heldout_images[:10])
    assert feats.shape == (10, judge.feature_dim) and 64 <= judge.feature_dim <= 128


def test_judge_cache_reloads_same_weights(
    judge: DigitJudge, split: DigitsSplit, judge_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(list(judge_cache.glob("*.safetensors"))) == 1

    def no_training(*args: object, **kwargs: object) -> DigitJudge:
        raise AssertionError("cached judge was retrained")

    monkeypatch.setattr(judge_module, "train_judge", no_training)
    again = load_or_train_judge(judge_cache, seed=0, split=split)
    assert not again.training
    for (name, a), (_, b) in zip(judge.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_judge_training_is_deterministic(split: DigitsSplit) -> None:
    a, b = (train_judge(split, seed=3, epochs=1) for _ in range(2))
    c = train_judge(split, seed=4, epochs=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.head.weight, c.head.weight)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_scores_separate_real_digits_from_noise(judge: DigitJudge, split: DigitsSplit) -> None:
    real = digits_scores(
        split.train_images[:500], split.train_labels[:500], judge, split.heldout_images
    )
    gen = torch.Generator().manual_seed(0)
    noise_images = torch.rand(500, 3, 32, 32, generator=gen) * 2 - 1
    noise = digits_scores(noise_images, split.train_labels[:500], judge, split.heldout_images)
    assert real["accuracy"] >= 0.97 and noise["accuracy"] < 0.3
    assert noise["fd"] > 10 * real["fd"]
    assert real["diversity"] > 0.7 and real["precision"] > 0.7
    assert 0.8 < real["mean_pairwise_ratio"] < 1.25
    assert noise["precision"] < 0.2


def test_scores_resize_other_resolutions(judge: DigitJudge, split: DigitsSplit) -> None:
    images, labels = split.heldout_images[:200], split.heldout_labels[:200]
    big = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear")
    small = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    for x in (big, small, big[:, :1]):
        assert digits_scores(x, labels, judge, split.heldout_images)["accuracy"] >= 0.9
