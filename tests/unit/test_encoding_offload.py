"""Once data.cache_dir holds the text embeddings and the images' latents, training reads both from
the cache, the frozen encoders leave the accelerator, and prompts the cache lacks (sample grids,
the export check) still encode, on the CPU, with the result on the training device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distillkit.config import TeacherConfig
from distillkit.data.cache import CachedEncodings
from distillkit.data.sources import TrainData
from distillkit.teachers.base import tree_map
from distillkit.teachers.load import load_teacher

REPO = Path(__file__).resolve().parents[2]


def _leaves(tree) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    tree_map(lambda t: out.append(t) or t, tree)
    return out


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sana"])
def test_offloaded_encoders_still_answer_prompts_the_cache_lacks(family, monkeypatch):
    cfg = TeacherConfig(model_id="tiny", family=family, resolution=32)
    teacher = load_teacher(cfg, torch.device("cpu"), smoke=True)
    want = teacher.encode(["a prompt the cache lacks"])
    teacher._cache.clear()

    moved: list[torch.nn.Module] = []
    original_to = torch.nn.Module.to

    def spy(module, *args, **kwargs):
        moved.append(module)
        return original_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    teacher.device = torch.device("meta")  # an accelerator stand-in: tensors can move there
    latents = torch.zeros(2, *teacher.latent_shape())
    teacher.use_precomputed(CachedEncodings(Path("cache"), ["cached"], {}, {}, latents))
    monkeypatch.setattr(torch.nn.Module, "to", original_to)

    text = [m for n, m in teacher.pipe.components.items() if n.startswith("text_encoder") and m]
    vae = teacher.pipe.vae
    assert text and all(any(m is t for m in moved) for t in text)
    assert any(m is vae.encoder for m in moved)
    assert not any(m is vae.decoder or m is teacher.denoiser for m in moved)
    assert teacher.text_device == torch.device("cpu")

    got = teacher.encode(["a prompt the cache lacks"])
    for a, b in zip(
        _leaves(got.cond) + _leaves(got.uncond), _leaves(want.cond) + _leaves(want.uncond)
    ):
        assert a.device.type == "meta" and a.shape == b.shape


def test_batches_carry_the_latents_of_their_own_images():
    images = torch.arange(7.0).view(7, 1, 1, 1).expand(7, 3, 8, 8).clone()  # image i is all i
    data = TrainData([f"p{i}" for i in range(3)], images, [f"c{i}" for i in range(7)])
    data.latents = images[:, :1] * 2  # a stand-in encoder: latent i = 2 i
    for slot in range(5):
        _, imgs, caps, lat = data.batch(slot, 3, seed=0, shuffle=True)
        index = imgs[:, 0, 0, 0]
        assert torch.equal(lat[:, 0, 0, 0], 2 * index)
        assert caps == [f"c{int(i)}" for i in index]


def test_training_reads_cached_latents_instead_of_the_vae(tmp_path):
    """A smoke LCM run (real images) with the cache never calls the VAE encoder after start-up
    and trains as the run without it does."""
    from accelerate import Accelerator

    from distillkit.config import load_config
    from distillkit.engine.loop import Trainer

    def trainer(name: str, *extra: str) -> Trainer:
        cfg = load_config(
            REPO / "recipes" / "lcm_sd15.yaml",
            [f"output_dir={tmp_path / name}", "logging.progress_bar=false", *extra],
        )
        (tmp_path / name).mkdir()
        return Trainer(cfg, Accelerator(mixed_precision="no"), smoke=True, builtin_data=True)

    plain = trainer("plain")
    cached = trainer("cached", f"data.cache_dir={tmp_path / 'cache'}")
    assert cached.data.latents is not None

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE encoder ran although the cache holds every image's latents")

    cached.teacher.pipe.vae.encode = refuse
    _, images, _, latents = cached.data.batch(0, 2, seed=0)
    torch.testing.assert_close(latents, plain.teacher.encode_images(images), rtol=1e-4, atol=1e-5)
    for step in range(2):
        a, b = plain.train_step(step), cached.train_step(step)
        for key in ("generator/loss", "generator/grad_norm"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4), (key, step)
