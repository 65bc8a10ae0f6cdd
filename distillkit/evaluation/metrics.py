"""Digits benchmark metrics in the judge's feature space: accuracy, Fréchet distance, diversity.

The Fréchet distance is the FID formula with the digit judge in place of Inception. Precision
and recall follow Kynkäänniemi et al. 2019 (k-NN manifolds), which separate "looks real"
from "covers all the real variety": one-step students often trade the second for the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distillkit.data.digits import IMAGE_SIZE, NUM_CLASSES
from distillkit.evaluation.judge import DigitJudge

ArrayLike = np.ndarray | torch.Tensor


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64 for a stable FD."""
    f = _np64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix; tiny negative eigenvalues (round-off) clip to 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrt(s1 s2)) between two Gaussians.

    tr(sqrt(s1 s2)) = sum of sqrt(eig(sqrt(s1) s2 sqrt(s1))): that matrix is symmetric PSD, so
    eigh is real and stable even for singular covariances (fewer samples than dimensions),
    where scipy's sqrtm needs an eps offset and returns complex round-off.
    """
    m1, m2 = _np64(mu1).ravel(), _np64(mu2).ravel()
    s1, s2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.size, m1.size):
        raise ValueError(f"shape mismatch: mu {m1.shape} {m2.shape}, sigma {s1.shape} {s2.shape}")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = m1 - m2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _knn_radii(f: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest *other* sample (k clipped to N - 1)."""
    if len(f) < 2:
        return torch.zeros(len(f), dtype=f.dtype)
    k = min(k, len(f) - 1)
    d = _pairwise(f, f)
    return d.kthvalue(k + 1, dim=1).values  # +1 skips the sample itself (distance 0)


def _coverage(queries: torch.Tensor, refs: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of `queries` inside the union of balls (refs, radii)."""
    inside = _pairwise(queries, refs) <= radii[None, :]
    return inside.any(dim=1).double().mean().item()


def _mean_pairwise(f: torch.Tensor) -> float:
    if len(f) < 2:
        return 0.0
    return torch.pdist(f).mean().item()


def diversity(features: ArrayLike, real_features: ArrayLike, k: int = 3) -> dict[str, float]:
    """k-NN precision / recall and mean pairwise distance of generated vs real features.

    - precision: share of generated samples inside the real k-NN manifold (they look real);
    - recall: share of real samples inside the generated k-NN manifold (variety is covered);
      identical copies have zero radii, so collapsed samples cover almost nothing;
    - mean_pairwise_ratio: mean pairwise distance of generated / real (1.0 = as diverse as
      real digits, ~0 = collapsed); the raw values are `mean_pairwise_distance(_real)`.
    """
    gen = torch.as_tensor(_np64(features))
    real = torch.as_tensor(_np64(real_features))
    gen_mpd, real_mpd = _mean_pairwise(gen), _mean_pairwise(real)
    return {
        "precision": _coverage(gen, real, _knn_radii(real, k)),
        "recall": _coverage(real, gen, _knn_radii(gen, k)),
        "mean_pairwise_distance": gen_mpd,
        "mean_pairwise_distance_real": real_mpd,
        "mean_pairwise_ratio": gen_mpd / real_mpd if real_mpd > 0 else float("nan"),
    }


def to_judge_input(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Any (N, C, H, W) image batch in [-1, 1] -> (N, 3, size, size) float32, as the judge wants.

    Pipelines may generate at 16, 64 or 512 px, grey or RGB; we resize (antialiased when
    shrinking) and clamp like saving to 8-bit would.
    """
    x = torch.as_tensor(images).float()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W), got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[-2:] != (size, size):
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=shrink)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def judge_outputs(
    judge: DigitJudge, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, predicted labels) for a batch of images, in batches to bound memory."""
    device = next(judge.parameters()).device
    was_training = judge.training
    judge.eval()
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        x = to_judge_input(images[i : i + batch_size]).to(device)
        f = judge.features(x)
        feats.append(f.cpu())
        preds.append(judge.head(f).argmax(1).cpu())
    judge.train(was_training)
    return torch.cat(feats), torch.cat(preds)


def per_class_accuracy(preds: ArrayLike, labels: ArrayLike) -> list[float | None]:
    """Accuracy on the samples prompted with each digit (None for a digit never prompted):
    a student that loses one digit reads as a small drop in the mean, and plainly here."""
    preds, labels = _np64(preds), _np64(labels)
    return [
        float((preds[labels == c] == c).mean()) if (labels == c).any() else None
        for c in range(NUM_CLASSES)
    ]


def digits_scores(
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    judge: DigitJudge,
    real_heldout_images: torch.Tensor,
    k: int = 3,
) -> dict[str, Any]:
    """Score generated digits against their prompted labels and the real held-out digits.

    Returns accuracy (judge argmax == prompted label), fd (Fréchet distance in judge features),
    diversity (= k-NN recall), precision, mean_pairwise_ratio, the sample count and the
    accuracy per prompted class.
    """
    labels_t = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if len(labels_t) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels_t)} labels")
    gen_feats, preds = judge_outputs(judge, images)
    real_feats, _ = judge_outputs(judge, real_heldout_images)
    fd = frechet_distance(*feature_stats(gen_feats), *feature_stats(real_feats))
    div = diversity(gen_feats, real_feats, k=k)
    return {
        "accuracy": (preds == labels_t).double().mean().item(),
        "fd": fd,
        "diversity": div["recall"],
        "precision": div["precision"],
        "mean_pairwise_ratio": div["mean_pairwise_ratio"],
        "n": float(len(images)),
        "per_class": per_class_accuracy(preds, labels_t),
    }


def style_statistic(images: torch.Tensor, style: str) -> float:
    """The mean of one number per image that separates a digits style from the plain digits
    (data.digits.restyle): ``bold``, the share of inked pixels (grey level above the middle);
    ``slant``, the ink's shear, cov(x, y) / var(y) of the ink-weighted pixel positions (x to
    the right, y up: positive leans right; ``backslant`` reads the same number)."""
    ink = ((images.float().mean(1) + 1.0) / 2.0).clamp(0.0, 1.0)  # (N, H, W), 1 = ink
    if style == "bold":
        return float((ink > 0.5).float().mean())
    if style in ("slant", "backslant"):
        n, h, w = ink.shape
        ys = torch.linspace(1.0, -1.0, h).view(1, h, 1).expand(n, h, w)  # up is positive
        xs = torch.linspace(-1.0, 1.0, w).view(1, 1, w).expand(n, h, w)
        mass = ink.sum((1, 2)).clamp_min(1e-6)
        mx, my = (ink * xs).sum((1, 2)) / mass, (ink * ys).sum((1, 2)) / mass
        cov = (ink * (xs - mx.view(-1, 1, 1)) * (ys - my.view(-1, 1, 1))).sum((1, 2)) / mass
        var = (ink * (ys - my.view(-1, 1, 1)) ** 2).sum((1, 2)) / mass
        return float((cov / var.clamp_min(1e-6)).mean())
    raise ValueError(f"unknown digits style {style!r}")
