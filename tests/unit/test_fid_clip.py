"""FID, precision / recall and CLIP score against the libraries' own reference computations.

No pretrained weights can be had offline, so the real architectures (torch-fidelity's FID
Inception v3, open_clip ViT-B-32) get seeded random weights in the libraries' file layouts,
saved and loaded the way users load the real ones. distillkit's FID (torchmetrics) is checked
against torch-fidelity's `calculate_metrics` on the same PNGs: a second entry point with its
own image loading, resize and Fréchet code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from distillkit.cli import main
from distillkit.clip import load_clip, scores_from_embeddings, to_pil
from distillkit.errors import ConfigError
from distillkit.evaluation.fid import FID, WEIGHTS_FILE, file_sha256, precision_recall
from distillkit.teachers.load import tiny_teacher_dir
from tests.helpers.metric_weights import random_clip_weights, random_inception_weights


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> Path:
    return random_inception_weights(tmp_path_factory.mktemp("fid") / WEIGHTS_FILE)


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    return random_clip_weights(tmp_path_factory.mktemp("clip") / "vit_b_32_random.safetensors")


@pytest.fixture(scope="module")
def scorer(clip_weights: Path):
    return load_clip("ViT-B-32", clip_weights)


def _images(seed: int, n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _write_pngs(folder: Path, pixels: np.ndarray) -> Path:
    folder.mkdir()
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> dict:
    """6 real and 6 generated 320 px images (downscaled to 299: the resize method matters);
    half the generated ones are real ones, so precision and recall are neither 0 nor 1."""
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (6, 40, 40, 3)), np.ones((1, 8, 8, 1)))
    real = smooth.astype(np.uint8)
    other = rng.integers(60, 200, (3, 320, 320, 3), dtype=np.uint8)
    fake = np.concatenate([real[:3], other])
    return {
        "real": _write_pngs(root / "real", real),
        "fake": _write_pngs(root / "fake", fake),
        "fake_images": torch.from_numpy(fake).permute(0, 3, 1, 2).float() / 127.5 - 1,
        "real_images": torch.from_numpy(real).permute(0, 3, 1, 2),
        "root": root,
    }


@pytest.fixture(scope="module")
def ours(two_sets, fid_weights):
    with threadpool_limits(1):
        fid = FID(fid_weights, keep_features=True)
        fid.load_reference(two_sets["real"], resolution=320, batch_size=3)
        fid.update(two_sets["fake_images"], real=False)
        return fid, fid.compute()


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch-fidelity's DataLoader worker note
def test_fid_and_prc_equal_torch_fidelity_on_the_same_pngs(two_sets, ours, fid_weights) -> None:
    import torch_fidelity

    fid, value = ours
    with threadpool_limits(1):
        ref = torch_fidelity.calculate_metrics(
            input1=str(two_sets["fake"]),
            input2=str(two_sets["real"]),
            fid=True,
            prc=True,
            feature_extractor="inception-v3-compat",
            feature_extractor_weights_path=str(fid_weights),
            cuda=False,
            cache=False,
            verbose=False,
        )
    expected = ref["frechet_inception_distance"]
    assert expected > 1.0  # not tiny: the relative tolerance means something
    assert value == pytest.approx(expected, rel=1e-3)
    prc = precision_recall(fid.feature_array(False), fid.feature_array(True))
    assert prc == pytest.approx({k: ref[k] for k in ("precision", "recall")}, abs=1e-6)
    assert 0 < prc["precision"] < 1 and fid.real_samples() == 6
    assert fid.protocol()["weights"]["sha256"] == file_sha256(fid_weights)


def test_fid_of_a_set_with_itself_is_zero_and_npz_roundtrips(two_sets, ours, fid_weights) -> None:
    fid, between = ours
    npz = two_sets["root"] / "real.npz"
    fid.save_reference(npz)
    with threadpool_limits(1):
        again = FID(fid_weights, keep_features=True)
        again.load_reference(npz, resolution=320)
        for name in ("real_features_sum", "real_features_cov_sum"):
            a, b = getattr(fid.metric, name), getattr(again.metric, name)
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * float(a.abs().max()))
        assert again.feature_array(True).shape == (6, 2048)
        again.update(two_sets["real_images"], real=False)  # the real set as the generated one
        assert abs(again.compute()) < 1e-3 * between


def test_resize_is_torch_fidelity_tf1_bilinear_not_the_torchmetrics_default(
    ours, fid_weights
) -> None:
    """Same weights, one 400 px image: our extractor gives torch-fidelity's own features, and
    torchmetrics' default (antialias=True) would give others."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import NoTrainInceptionV3

    x = (torch.rand(1, 3, 400, 400, generator=torch.Generator().manual_seed(4)) * 255).byte()
    fid, _ = ours
    with torch.no_grad(), threadpool_limits(1):
        mine = fid.metric.inception(x)
        lib = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(fid_weights))(x)[0]
        aa = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(fid_weights), antialias=True)
        default = aa(x)
    assert torch.allclose(mine, lib, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mine, default, rtol=1e-3, atol=1e-3)
    assert "TF1" in fid.protocol()["resize"]


def test_missing_or_wrong_weights_name_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(ConfigError) as err:
        FID(None)
    text = str(err.value)
    assert WEIGHTS_FILE in text and str(tmp_path / "torch_home" / "hub" / "checkpoints") in text
    assert "--fid-weights" in text and "never downloads" in text
    with pytest.raises(ConfigError, match="nope.pth does not exist"):
        FID(tmp_path / "nope.pth")
    tv = tmp_path / "tv.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tv)
    with pytest.raises(ConfigError, match="not the FID Inception"):
        FID(tv)
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": Path("x")}, evil)  # an object weights_only refuses to unpickle
    with pytest.raises(ConfigError, match="is not a torch state dict"):
        FID(evil)


def test_the_library_would_download_and_our_path_prevents_it(fid_weights, monkeypatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    from torchmetrics.image.fid import FrechetInceptionDistance

    urls: list[str] = []

    def no_network(url: str, **kwargs):
        urls.append(url)
        raise RuntimeError("network")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError, match="network"):
        FrechetInceptionDistance(feature=2048)
    assert urls and urls[0].startswith("https://") and urls[0].endswith(WEIGHTS_FILE)
    FID(fid_weights)
    assert len(urls) == 1


def test_clip_score_matches_direct_cosine(scorer) -> None:
    images = _images(3, n=3, size=48)
    prompts = ["a red fox", "an astronaut riding a horse", "a bowl of ramen"]
    scores = scorer.scores(images, prompts)
    with torch.no_grad():
        pixels = torch.stack([scorer.preprocess(im) for im in to_pil(images)])
        img = scorer.model.encode_image(pixels).double().numpy()
        txt = scorer.model.encode_text(scorer.tokenizer(prompts)).double().numpy()
    cos = (img * txt).sum(1) / (np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1))
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), atol=1e-4)
    assert scorer.protocol()["scale"] == 100.0


def test_clip_score_scale_and_clamp() -> None:
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [4.0, 3.0]])
    expected = torch.tensor([100.0, 0.0, 0.0, 96.0], dtype=torch.float64)
    assert torch.allclose(scores_from_embeddings(e, t), expected)


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    prompts = root / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse at dusk\n")
    ref = root / "real"
    ref.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(ref / f"{i}.png")
    return {"prompts": prompts, "ref": ref, "pipe": tiny_teacher_dir("sd15", 32)}


def test_eval_cli_writes_scores_and_protocol(
    eval_inputs: dict[str, Path], fid_weights: Path, clip_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval.json"
    argv = ["eval", str(eval_inputs["pipe"]), "--prompts", str(eval_inputs["prompts"])]
    argv += ["--steps", "2", "--guidance", "1", "--images-per-prompt", "2", "--seed", "5"]
    argv += ["--fid-weights", str(fid_weights), "--fid-reference", str(eval_inputs["ref"])]
    argv += ["--clip-model", "ViT-B-32", "--clip-weights", str(clip_weights), "--out", str(out)]
    with threadpool_limits(1):
        assert main(argv) == 0
    scores = json.loads(out.read_text())
    assert scores["n"] == 4 and scores["fid"] >= 0 and 0 <= scores["clip_score"] <= 100
    p = scores["protocol"]
    assert p["samples"] == 4 and p["seed"] == 5 and p["batch_seeds"] == [5] and p["steps"] == 2
    assert "InceptionV3 pool3 (2048-d)" in p["fid"]["feature_extractor"]
    assert "torchmetrics" in p["fid"]["implementation"] and "TF1" in p["fid"]["resize"]
    assert p["fid"]["reference_samples"] == 3
    assert p["fid"]["weights"] == {"file": WEIGHTS_FILE, "sha256": file_sha256(fid_weights)}
    assert p["clip"]["weights_sha256"] == file_sha256(clip_weights)
    assert [r["label"] for r in scores["runs"]] == [eval_inputs["pipe"].name]
    assert p["clip"]["scale"] == 100.0 and "ViT-B-32" in p["clip"]["model"]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--metrics", "fid", "--fid-reference", "REF"], "--fid-weights"),
        (
            ["--metrics", "fid", "--fid-weights", "/nonexistent/w.pth", "--fid-reference", "REF"],
            "--fid-weights",
        ),
        (["--metrics", "clip"], "--clip-weights"),
        (["--metrics", "fid"], "--fid-reference"),
        (["--metrics", "fidd"], "--metrics"),
    ],
)
def test_missing_weights_exit_2_naming_the_option(
    eval_inputs: dict[str, Path], tmp_path: Path, monkeypatch, capsys, extra, named
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    extra = [str(eval_inputs["ref"]) if e == "REF" else e for e in extra]
    argv = ["eval", str(eval_inputs["pipe"]), "--prompts", str(eval_inputs["prompts"])]
    assert main([*argv, "--steps", "1", "--guidance", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    if named == "--fid-weights":
        assert "never downloads" in err and WEIGHTS_FILE in err
