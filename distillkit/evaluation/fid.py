"""FID with the usual Inception protocol, from weights on disk (never downloaded).

Why this file: pytorch-fid, torch-fidelity and clean-fid fetch Inception at run time, which
fails offline and hides which weights produced a number. Here the architecture is pytorch-fid's
FID Inception v3 (TF-ported pooling quirks) when given its `pt_inception-2015-12-05` weights,
or torchvision's inception_v3 for its ImageNet weights; both give 2048-d pool3 features of
images quantized to 8 bits, resized to 299x299 bilinear and scaled to [-1, 1] like pytorch-fid.
The Fréchet distance itself is `metrics.frechet_distance` (float64, eigh-based).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

from distillkit.errors import ConfigError
from distillkit.evaluation.metrics import feature_stats, frechet_distance

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release asset
TORCHVISION_WEIGHTS = "inception_v3_google-0cc3c7bd.pth"  # torchvision IMAGENET1K_V1
RESIZE = 299
WEIGHTS_HINT = (
    f"pass --fid-weights PATH: pytorch-fid's {FID_WEIGHTS} (the standard FID) or torchvision's "
    f"{TORCHVISION_WEIGHTS}, or put one in the torch hub cache ({{hub}}/checkpoints); "
    "distillkit never downloads them"
)


def _avg3(x: torch.Tensor) -> torch.Tensor:
    """TF's average pool ignores the zero padding; torchvision's counts it."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tv.InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))]


class FIDInceptionC(tv.InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for i in range(2, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return [self.branch1x1(x), b7, bd, self.branch_pool(_avg3(x))]


class FIDInceptionE(tv.InceptionE):
    """E_1 (average pool without padding) or E_2 (max pool), as in the TF graph."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return [self.branch1x1(x), b3, bd, self.branch_pool(pooled)]


def build_inception(flavour: str = "pytorch-fid") -> tv.Inception3:
    """Random-weight Inception v3: pytorch-fid's FID variant (1008 classes) or torchvision's."""
    if flavour == "torchvision":
        return tv.Inception3(num_classes=1000, aux_logits=False, init_weights=False)
    if flavour != "pytorch-fid":
        raise ValueError(f"unknown Inception flavour {flavour!r}")
    net = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    net.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    return net


def default_weights() -> Path | None:
    """The first Inception weight file found in the torch hub cache (FID's preferred)."""
    root = Path(torch.hub.get_dir()) / "checkpoints"
    for name in (FID_WEIGHTS, TORCHVISION_WEIGHTS):
        if (root / name).is_file():
            return root / name
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] -> (N, 2048) pool3 features under the pytorch-fid input protocol."""

    def __init__(self, net: tv.Inception3, flavour: str, weights: str) -> None:
        super().__init__()
        net.fc = nn.Identity()  # pool3 -> (dropout, identity in eval) -> features
        net.transform_input = False  # inputs are already scaled to [-1, 1]
        self.net = net.eval().requires_grad_(False)
        self.flavour, self.weights = flavour, weights

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(images).float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round() / 255.0  # what a saved PNG would hold
        x = F.interpolate(x, size=(RESIZE, RESIZE), mode="bilinear", align_corners=False)
        return self.net(2 * x - 1).flatten(1)

    def protocol(self) -> dict[str, Any]:
        return {
            "feature_extractor": f"InceptionV3 pool3 (2048-d), {self.flavour} architecture",
            "weights": self.weights,
            "input": "8-bit quantized RGB, scaled to [-1, 1]",
            "resize": f"bilinear {RESIZE}x{RESIZE} (align_corners=False, no antialias)",
        }


def load_inception(weights: Path | str | None, device: str | torch.device = "cpu"):
    """InceptionFeatures from a weight file (flavour read from its classifier size)."""
    path = Path(weights).expanduser() if weights else default_weights()
    hint = WEIGHTS_HINT.format(hub=torch.hub.get_dir())
    if path is None:
        raise ConfigError(f"--fid-weights: no Inception weights found; {hint}")
    if not path.is_file():
        raise ConfigError(f"--fid-weights: {path} does not exist; {hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
        classes = int(state["fc.weight"].shape[0])
        flavour = "pytorch-fid" if classes == 1008 else "torchvision"
        net = build_inception(flavour)
        net.load_state_dict(state)
    except Exception as err:
        raise ConfigError(
            f"--fid-weights: {path} is not an Inception v3 state dict "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    name = f"{path.name} (sha256 {_sha256(path)[:12]})"
    return InceptionFeatures(net, flavour, name).to(device)


@torch.no_grad()
def inception_features(
    model: InceptionFeatures, images: torch.Tensor, batch_size: int = 50
) -> np.ndarray:
    device = next(model.parameters()).device
    parts = [
        model(images[i : i + batch_size].to(device)).double().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts).numpy()


def reference_stats(
    reference: Path | str, model: InceptionFeatures, resolution: int | None = None
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, n) from a pytorch-fid .npz (mu, sigma) or from a folder of images."""
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ConfigError(f"--fid-reference: {path} lacks 'mu'/'sigma' arrays")
            return data["mu"], data["sigma"], None
    if not path.is_dir():
        raise ConfigError(f"--fid-reference: {path} is neither a folder of images nor an .npz")
    from distillkit.data.sources import read_image_folder

    try:
        images, _ = read_image_folder(path, resolution or RESIZE)
    except ConfigError as err:  # its messages name data.images; here the option is ours
        raise ConfigError(str(err).replace("data.images", "--fid-reference")) from None
    if len(images) < 2:
        raise ConfigError(f"--fid-reference: {path} needs at least 2 images")
    mu, sigma = feature_stats(inception_features(model, images))
    return mu, sigma, len(images)


def fid_from_features(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    return frechet_distance(*feature_stats(features), mu_ref, sigma_ref)
