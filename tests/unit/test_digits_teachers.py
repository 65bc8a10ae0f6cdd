"""Digits teachers (quick specs): they train, save, reload, load as cards and are cached."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from distillkit.benchmark import teachers as T
from distillkit.benchmark.text_pretrain import supervised_contrastive
from distillkit.config import TeacherConfig
from distillkit.data.digits import load_digits_split
from distillkit.errors import ConfigError
from distillkit.export.card import export_resolution, export_sampling_kwargs
from distillkit.teachers.load import load_teacher

CLASS_NAMES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sana": "SanaPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Two threads on two cores shared with other jobs can stall 20x; one stays predictable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("family", sorted(CLASS_NAMES))
def test_quick_teacher_trains_saves_and_loads(family: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path))
    out = T.digits_teacher_dir(family, quick=True)
    assert out.parent == tmp_path / "digits"
    assert not list(out.parent.glob("*.tmp*")), "the temp dir is renamed, not left behind"
    report = json.loads((out / T.REPORT_FILE).read_text())
    assert report["loss_final"] < 0.8 * report["loss_first"], report
    if family == "flux":  # the guidance input learns u + g (c - u), as FLUX.1-dev's did
        assert report["guidance_loss_final"] < 0.8 * report["guidance_loss_first"], report
    else:
        assert "guidance_loss_final" not in report

    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == CLASS_NAMES[family]
    length = T.get_spec(family).max_sequence_length  # evaluation reads it from distillkit.json
    assert export_sampling_kwargs(out, 25) == ({"max_sequence_length": length} if length else {})
    assert export_resolution(out) == 32  # FluxPipeline's own default would be 512 px here
    heldout = load_digits_split().heldout_images[:64]
    untrained = T.build_untrained(T.get_spec(family, quick=True)).vae
    assert T.vae_recon_error(pipe.vae, heldout) < 0.5 * T.vae_recon_error(untrained, heldout)

    # A card's "digits:<family>" resolves to the cached directory: no second training.
    def no_training(*args, **kwargs):
        raise AssertionError("the cached teacher should have been reused")

    monkeypatch.setattr(T, "train_digits_teacher", no_training)
    monkeypatch.setitem(T.SPECS, family, T.get_spec(family, quick=True))
    assert T.digits_teacher_dir(family) == out
    cfg = TeacherConfig(model_id=f"digits:{family}", family=family, resolution=32, dtype="fp32")
    adapter = load_teacher(cfg, torch.device("cpu"))
    assert type(adapter.pipe).__name__ == CLASS_NAMES[family]
    cond = adapter.encode(["a handwritten digit seven", "a handwritten digit one"])
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), adapter.schedule.t_max / 2)
    x0 = adapter.denoise(adapter.denoiser, x, t, cond, guidance=2.0)
    assert x0.shape == x.shape and torch.isfinite(x0).all()


def test_same_spec_same_weights(tmp_path) -> None:
    T.train_digits_teacher("sd15", tmp_path / "a", quick=True)
    T.train_digits_teacher("sd15", tmp_path / "b", quick=True)
    for part in ("unet", "vae", "text_encoder"):
        a = load_file(next((tmp_path / "a" / part).glob("*.safetensors")))
        b = load_file(next((tmp_path / "b" / part).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_unknown_digits_family_is_a_config_error() -> None:
    cfg = TeacherConfig(model_id="digits:dalle", family="sd15", resolution=32)
    with pytest.raises(ConfigError, match="digits teachers exist for"):
        load_teacher(cfg, torch.device("cpu"))


def test_spec_key_changes_with_the_spec() -> None:
    spec = T.get_spec("sd15")
    assert spec.key() == T.get_spec("sd15").key()
    assert spec.key() != spec.quick().key()
    assert spec.quick().quick() == spec.quick()


def test_supervised_contrastive_prefers_label_clusters() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, 0.1]])
    mixed = clustered[[0, 2, 1, 3]]
    assert supervised_contrastive(clustered, labels) < supervised_contrastive(mixed, labels)


def test_uncentred_contrastive_charges_for_a_shared_offset() -> None:
    """Clusters riding on a large offset every feature shares: centring removes the offset (a
    low loss); uncentred, the features are nearly parallel, so each sample's softmax over the
    other N - 1 is nearly uniform: the loss is log(N - 1), the known answer, minus a little."""
    labels = torch.tensor([0, 0, 1, 1])
    signal = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, 0.1]])
    features = torch.cat([signal * 1e-3, torch.full((4, 1), 10.0)], dim=1)
    centred = supervised_contrastive(features, labels)
    uncentred = supervised_contrastive(features, labels, centre=False)
    assert centred < 0.1
    assert abs(uncentred.item() - math.log(3)) < 1e-3


@pytest.mark.parametrize("family", sorted(T.SPECS))
def test_each_digits_card_encodes_prompts_as_its_teacher_was_trained(family: str) -> None:
    """A card's max_sequence_length is its spec's: students encode what the teacher learnt."""
    cards = Path(__file__).resolve().parents[2] / "teachers" / "digits"
    card = yaml.safe_load((cards / f"{family}.yaml").read_text())
    assert card["model_id"] == f"digits:{family}" and card["family"] == family
    assert card.get("max_sequence_length") == T.get_spec(family).max_sequence_length
