"""FID (and Inception precision / recall) through the field's libraries, weights from disk only.

The protocol: torchmetrics' `FrechetInceptionDistance` on torch-fidelity's `inception-v3-compat`
extractor (the TF-ported Inception of the original FID code) with `antialias=False`, so images
are resized to 299x299 by torch-fidelity's TF1-style bilinear, as the TTUR / pytorch-fid numbers
that DMD2, SiD and GigaGAN report were. torchmetrics' default (`antialias=True`) and clean-fid
(PIL bicubic) resize differently and give different numbers, so they are not used. Inputs are
8-bit images (what a saved PNG holds). Precision / recall: torch-fidelity's `prc` (k=3) on the
same 2048-d pool3 features.

Nothing is downloaded: without a local weight file both libraries would fetch
`weights-inception-2015-12-05-6726825d.pth` from GitHub; here a missing file is a ConfigError.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillkit.errors import ConfigError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's v0.2.0 asset
IMPLEMENTATION = (
    "torchmetrics FrechetInceptionDistance(feature=2048, antialias=False) on torch-fidelity "
    "inception-v3-compat"
)
RESIZE = "torch-fidelity TF1-compatible bilinear to 299x299 (align_corners=False, no antialias)"
PRC_NEIGHBOURS = 3


def weights_hint() -> str:
    where = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"download torch-fidelity's {WEIGHTS_FILE} (github.com/toshas/torch-fidelity/releases, "
        f"v0.2.0) once and pass --fid-weights PATH or put it in {where}; distillkit never "
        "downloads it"
    )


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_weights(weights: Path | str | None) -> Path:
    """The weight file to use: the given path, else the torch hub cache; checked, never fetched.

    torch-fidelity itself unpickles with `weights_only=False`; loading here with
    `weights_only=True` first rejects a file that would run code and checks the layout.
    """
    path = Path(weights).expanduser() if weights else None
    if path is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
        if not path.is_file():
            raise ConfigError(f"--fid-weights: no {WEIGHTS_FILE} found at {path}; {weights_hint()}")
    if not path.is_file():
        raise ConfigError(f"--fid-weights: {path} does not exist; {weights_hint()}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        fc = state["fc.weight"]
        ok = tuple(fc.shape) == (1008, 2048) and "Mixed_7c.branch_pool.conv.weight" in state
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(
            f"--fid-weights: {path} is not a torch state dict ({type(err).__name__}: {first}); "
            f"{weights_hint()}"
        ) from None
    if not ok:
        raise ConfigError(
            f"--fid-weights: {path} is not the FID Inception ({WEIGHTS_FILE}, 1008 classes); "
            "torchvision's ImageNet inception_v3 gives different features"
        )
    return path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 1|3, H, W) in [-1, 1] -> (N, 3, H, W) uint8, rounded as saving a PNG would."""
    x = images.detach().float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8)


class FID:
    """torchmetrics FID with the real statistics kept across generated sets (teacher vs student).

    ``keep_features``: also keep the pool3 features (for precision / recall), caught by a forward
    hook on the library's own extractor so every image passes through Inception once.
    """

    def __init__(
        self, weights: Path | str | None, device: str | torch.device = "cpu", keep_features=False
    ) -> None:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError:
            raise ConfigError(
                "FID needs torchmetrics + torch-fidelity: pip install '.[eval]'"
            ) from None
        path = resolve_weights(weights)
        self.metric = FrechetInceptionDistance(
            feature=2048,
            reset_real_features=False,
            sync_on_compute=False,  # ranks gather features themselves (prompt_eval / shard.py)
            normalize=False,
            antialias=False,
            feature_extractor_weights_path=str(path),
        ).to(device)
        self.device = torch.device(device)
        self.weights = {"file": path.name, "sha256": file_sha256(path)}
        self.features: dict[bool, list[torch.Tensor]] = {True: [], False: []}
        self._real = False
        self.keep_features = keep_features
        self.metric.inception.register_forward_hook(self._keep)
        self.reference: dict[str, Any] = {}

    def _keep(self, module, inputs, output) -> None:
        if self.keep_features:
            self.features[self._real].append(output.detach().float().cpu())

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add images in [-1, 1] (or uint8) to the real or the generated set."""
        x = images if images.dtype == torch.uint8 else to_uint8(images)
        self._real = real
        self.metric.update(x.to(self.device), real=real)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """pool3 features (float32, CPU) of images, leaving the metric as it was: what each rank
        computes on its shard before the features are gathered."""
        x = images if images.dtype == torch.uint8 else to_uint8(images)
        keep, self.keep_features = self.keep_features, False
        try:
            return self.metric.inception(x.to(self.device)).detach().float().cpu()
        finally:
            self.keep_features = keep

    def set_generated(self, batches: list[torch.Tensor]) -> None:
        """The generated set from ``extract``'s features, batch by batch in sample order: the
        sums torchmetrics' own ``update`` forms (float64), so a gathered set scores as if one
        process had passed the images through ``update``."""
        self.reset_generated()
        m = self.metric
        for feats in batches:
            f = feats.to(m.fake_features_sum.device).double()
            m.fake_features_sum += f.sum(dim=0)
            m.fake_features_cov_sum += f.t().mm(f)
            m.fake_features_num_samples += f.shape[0]
            m.orig_dtype = feats.dtype  # compute() casts its result to the features' dtype
        if self.keep_features:
            self.features[False] = [f.float().cpu() for f in batches]

    def compute(self) -> float:
        with warnings.catch_warnings():  # set_generated fills the states without update()
            warnings.filterwarnings("ignore", "The ``compute`` method", UserWarning)
            return float(self.metric.compute())

    def reset_generated(self) -> None:
        """Forget the generated set; the real statistics stay (reset_real_features=False)."""
        self.metric.reset()
        self.features[False] = []

    def feature_array(self, real: bool) -> np.ndarray:
        return (
            torch.cat(self.features[real]).numpy() if self.features[real] else np.empty((0, 2048))
        )

    def real_samples(self) -> int:
        return int(self.metric.real_features_num_samples)

    def protocol(self) -> dict[str, Any]:
        return {
            "implementation": IMPLEMENTATION,
            "feature_extractor": "InceptionV3 pool3 (2048-d), TF FID graph port",
            "weights": self.weights,
            "input": "8-bit RGB (rounded as a PNG), uint8 into the extractor",
            "resize": RESIZE,
            **self.reference,
        }

    def load_reference(self, reference: Path | str, resolution: int, batch_size: int = 50) -> None:
        """Real statistics from a folder of images (streamed) or an .npz with mu / sigma."""
        path = Path(reference).expanduser()
        if path.is_file() and path.suffix == ".npz":
            self._load_npz(path)
        elif path.is_dir():
            n = self._load_folder(path, resolution, batch_size)
            self.reference = {
                "reference": str(path),
                "reference_samples": n,
                "reference_resize": f"short side to {resolution} (PIL bicubic), centre crop",
            }
        else:
            raise ConfigError(
                f"--fid-reference: {path} is neither a folder of images nor an .npz "
                "(mu, sigma[, n, features])"
            )

    def _load_folder(self, folder: Path, resolution: int, batch_size: int) -> int:
        from PIL import Image, UnidentifiedImageError

        from distillkit.data.sources import IMAGE_SUFFIXES, to_tensor

        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise ConfigError(f"--fid-reference: {folder} needs at least 2 images")
        for start in range(0, len(files), batch_size):
            batch = []
            for file in files[start : start + batch_size]:
                try:
                    with Image.open(file) as img:
                        batch.append(to_tensor(img.convert("RGB"), resolution))
                except (UnidentifiedImageError, OSError):
                    raise ConfigError(f"--fid-reference: {file} is not a readable image") from None
            self.update(torch.stack(batch), real=True)
        return len(files)

    def _load_npz(self, path: Path) -> None:
        """pytorch-fid / torch-fidelity statistics into the metric's own (sum, cov-sum, n) state."""
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ConfigError(f"--fid-reference: {path} lacks 'mu'/'sigma' arrays")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            n = int(data["n"]) if "n" in data else 2  # any n >= 2 reproduces mu and sigma
            if "features" in data:
                self.features[True] = [torch.from_numpy(data["features"]).float()]
        if mu.shape != (2048,) or sigma.shape != (2048, 2048):
            raise ConfigError(f"--fid-reference: {path} holds {mu.shape} statistics, not 2048-d")
        m, s = torch.from_numpy(mu), torch.from_numpy(sigma)
        device = self.metric.real_features_sum.device
        self.metric.real_features_sum = (n * m).to(device)
        self.metric.real_features_cov_sum = ((n - 1) * s + n * torch.outer(m, m)).to(device)
        self.metric.real_features_num_samples = torch.tensor(n, device=device)
        self.reference = {"reference": str(path), "reference_samples": n if n > 2 else None}

    def save_reference(self, path: Path | str) -> None:
        """The real statistics as an .npz (mu, sigma like pytorch-fid, n, features if kept)."""
        m = self.metric
        n = self.real_samples()
        mu = m.real_features_sum / n
        sigma = (m.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
        arrays = {"mu": mu.cpu().numpy(), "sigma": sigma.cpu().numpy(), "n": np.array(n)}
        if self.features[True]:
            arrays["features"] = self.feature_array(True)
        np.savez(path, **arrays)


def precision_recall(generated: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """Improved precision / recall (Kynkäänniemi et al.) by torch-fidelity, k=3 neighbours."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    for name, feats in (("generated", generated), ("reference", real)):
        if len(feats) <= PRC_NEIGHBOURS:
            raise ConfigError(
                f"precision/recall needs more than {PRC_NEIGHBOURS} {name} samples "
                "(a reference folder, or an .npz with 'features')"
            )
    out = prc_features_to_metric(
        torch.from_numpy(np.asarray(generated, np.float32)),
        torch.from_numpy(np.asarray(real, np.float32)),
        prc_neighborhood=PRC_NEIGHBOURS,
        prc_batch_size=10000,
        save_cpu_ram=len(generated) + len(real) > 20000,
        verbose=False,
    )
    return {"precision": float(out["precision"]), "recall": float(out["recall"])}
