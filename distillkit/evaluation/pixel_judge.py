"""A second digits judge of another kind: an RBF kernel SVM on the 8x8 pooled pixels.

One judge can be fooled in ways another is not. The CNN judge (judge.py) learns shift-robust
conv features; this one sees only the raw grey levels at the digits' native 8x8 resolution
(sklearn's scans are 8x8), so a student that draws strokes the CNN accepts but that sit in
unusual places, with unusual thickness or contrast, reads differently here. Its Fréchet
distance lives in that same 64-d pixel space, with no learned features at all.

Trained on the training split only (sklearn's SVC is deterministic: libsvm, float64, no
random state when ``probability=False``), in about a second, so it is never cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from distillkit.data.digits import DigitsSplit

POOLED_SIZE = 8  # sklearn's digits are 8x8 scans
SVM_C = 10.0
PIXEL_JUDGE_VERSION = 1


def pooled_pixels(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] -> (N, 64) float64 grey levels in [0, 1] (1 = ink).

    Any resolution: area-averaged down to 8x8, like looking at the scan itself.
    """
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W), got {tuple(x.shape)}")
    grey = ((x.clamp(-1.0, 1.0).mean(1, keepdim=True) + 1.0) / 2.0).double()
    pooled = F.adaptive_avg_pool2d(grey, POOLED_SIZE)
    return pooled.flatten(1).numpy()


@dataclass(frozen=True)
class PixelJudge:
    """`predict` reads digit classes, `features` gives the FD space (the pooled pixels)."""

    svm: object  # sklearn.svm.SVC, fitted

    def features(self, images: torch.Tensor) -> np.ndarray:
        return pooled_pixels(images)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return np.asarray(self.svm.predict(pooled_pixels(images)), dtype=np.int64)


def train_pixel_judge(split: DigitsSplit) -> PixelJudge:
    """Fit on `split.train_*` only; the same split always gives the same judge."""
    from sklearn.svm import SVC

    svm = SVC(kernel="rbf", C=SVM_C, gamma="scale")
    svm.fit(pooled_pixels(split.train_images), split.train_labels.numpy())
    return PixelJudge(svm=svm)


def pixel_judge_protocol() -> dict[str, object]:
    """What fixes a pixel-judge score (recorded next to the CNN judge's protocol)."""
    return {
        "version": PIXEL_JUDGE_VERSION,
        "kind": "sklearn SVC rbf",
        "C": SVM_C,
        "gamma": "scale",
        "input": f"grey {POOLED_SIZE}x{POOLED_SIZE} area pool",
    }


def pixel_scores(
    images: torch.Tensor, labels: torch.Tensor, judge: PixelJudge, real_heldout: torch.Tensor
) -> dict[str, object]:
    """Accuracy, per-class accuracy and Fréchet distance in pooled-pixel space."""
    from distillkit.evaluation.metrics import feature_stats, frechet_distance, per_class_accuracy

    y = torch.as_tensor(labels).reshape(-1).numpy()
    preds = judge.predict(images)
    fd = frechet_distance(
        *feature_stats(judge.features(images)), *feature_stats(judge.features(real_heldout))
    )
    return {
        "accuracy": float((preds == y).mean()),
        "fd": fd,
        "per_class": per_class_accuracy(preds, y),
    }
