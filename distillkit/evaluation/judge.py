"""A small CNN that judges generated digits: its argmax scores prompt accuracy, its penultimate
layer is the feature space for the Fréchet distance and the diversity metrics.

No pretrained image weights can be had offline, so we train our own judge on the real digits'
training split only (never on held-out digits, never on generated images). Training is seeded
and the weights are cached, so every run of the benchmark scores with the same judge.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from distillkit.data.digits import NUM_CLASSES, DigitsSplit, load_digits_split

# Bump when the architecture or the training recipe changes: it invalidates cached weights.
JUDGE_VERSION = 1
FEATURE_DIM = 64
DEFAULT_EPOCHS = 12


class DigitJudge(nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4 px), then a 64-d feature layer and a 10-way head.

    Input: (N, 3, 32, 32) in [-1, 1]. Small enough to train in seconds on a laptop CPU.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim): the space the Fréchet distance lives in."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` px, filling with background (-1), no wrap-around.

    Generated digits are rarely centred the way the scans are; shifts make the judge robust.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None]  # (n, 1, h, 1)
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


def train_judge(
    split: DigitsSplit,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 64,
    lr: float = 3e-3,
    max_shift: int = 2,
) -> DigitJudge:
    """Train on `split.train_*` only, deterministically for a given seed; returns a frozen judge."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = DigitJudge()
    images, labels = split.train_images.float(), split.train_labels.long()
    n = len(labels)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    judge.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = random_shift(images[idx], max_shift, generator)
            loss = F.cross_entropy(judge(x), labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return _freeze(judge)


def _freeze(judge: DigitJudge) -> DigitJudge:
    judge.eval()
    judge.requires_grad_(False)
    return judge


def judge_cache_key(seed: int, split: DigitsSplit, epochs: int = DEFAULT_EPOCHS) -> str:
    """Hash of everything that decides the weights, so a stale cache is never reused."""
    spec = f"digitjudge-v{JUDGE_VERSION}-seed{seed}-split{split.seed}-{split.test_fraction}"
    spec += f"-epochs{epochs}-dim{FEATURE_DIM}"
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def load_or_train_judge(
    cache_dir: Path | str,
    seed: int = 0,
    split: DigitsSplit | None = None,
    epochs: int = DEFAULT_EPOCHS,
) -> DigitJudge:
    """Load the cached judge for (version, seed, split) or train it once and cache it.

    `split` defaults to `load_digits_split()`. The file is written atomically so concurrent
    benchmark processes never read a half-written cache.
    """
    split = split if split is not None else load_digits_split()
    cache_dir = Path(cache_dir)
    path = cache_dir / f"digit_judge_{judge_cache_key(seed, split, epochs)}.safetensors"
    if path.exists():
        judge = DigitJudge()
        judge.load_state_dict(load_file(str(path)))
        return _freeze(judge)
    start = time.perf_counter()
    judge = train_judge(split, seed=seed, epochs=epochs)
    seconds = time.perf_counter() - start
    accuracy = judge_accuracy(judge, split.heldout_images, split.heldout_labels)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    metadata = {
        "version": str(JUDGE_VERSION),
        "seed": str(seed),
        "split_seed": str(split.seed),
        "test_fraction": str(split.test_fraction),
        "epochs": str(epochs),
        "heldout_accuracy": f"{accuracy:.4f}",
        "train_seconds": f"{seconds:.1f}",
    }
    state = {k: v.contiguous() for k, v in judge.state_dict().items()}
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return judge


@torch.no_grad()
def judge_accuracy(
    judge: DigitJudge, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Fraction of `images` whose argmax class equals `labels`."""
    preds = torch.cat(
        [judge(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
    )
    return (preds == labels.to(preds.device)).float().mean().item()
