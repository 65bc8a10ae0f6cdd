"""Random-weight stand-ins for the metric models, saved in the libraries' own file layouts.

No pretrained weights can be had offline. The FID Inception is torch-fidelity's own class,
built without its download and re-initialised with seeded Kaiming weights (so pool3 features
are O(1), not 1e-8) and randomised BatchNorm statistics; its state dict is what
`weights-inception-2015-12-05-6726825d.pth` holds, key for key.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    cls = tfi.FeatureExtractorInceptionV3
    with (
        mock.patch.object(tfi, "load_state_dict_from_url", return_value={}),
        mock.patch.object(cls, "load_state_dict", lambda self, state: None),
    ):
        net = cls("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(1 + torch.rand(m.running_var.shape, generator=gen) * 0.2)
    torch.save(net.state_dict(), path)
    return path


def random_clip_weights(path: Path, model: str = "ViT-B-32", seed: int = 0) -> Path:
    """An open_clip model with seeded random weights, as a half-precision safetensors file."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = open_clip.create_model(model, pretrained=None)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path
