"""FID and CLIP score against direct reference computations, with random-weight models.

No pretrained weights can be had offline, so the real architectures (pytorch-fid's FID Inception
v3, open_clip ViT-B-32) get random weights, saved to files and loaded the way users load real
ones. The math is then checked against independent numpy/scipy computations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from distillkit.cli import main
from distillkit.clip import load_clip, scores_from_embeddings, to_pil
from distillkit.evaluation.fid import (
    build_inception,
    fid_from_features,
    inception_features,
    load_inception,
)
from distillkit.evaluation.metrics import feature_stats
from distillkit.teachers.load import tiny_teacher_dir


def _random_inception(flavour: str, path: Path) -> Path:
    """Kaiming-initialised (so pool3 features are O(1), not 1e-8), saved like a release file."""
    torch.manual_seed(0)
    net = build_inception(flavour)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> Path:
    return _random_inception("pytorch-fid", tmp_path_factory.mktemp("fid") / "pt_inception.pth")


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "vit_b_32_random.safetensors"
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def inception(fid_weights: Path):
    return load_inception(fid_weights)


@pytest.fixture(scope="module")
def scorer(clip_weights: Path):
    return load_clip("ViT-B-32", clip_weights)


def _images(seed: int, n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # few samples: singular
def test_fid_matches_direct_computation(inception) -> None:
    model = inception
    assert model.flavour == "pytorch-fid" and "sha256" in model.weights
    fa = inception_features(model, _images(0))
    fb = inception_features(model, _images(1) * 0.3)
    assert fa.shape == (4, 2048) and fa.std() > 1e-3
    with threadpool_limits(1):  # 2048x2048 eigh: BLAS threads only fight on a shared box
        mu_a, sigma_a = feature_stats(fa)
        assert abs(fid_from_features(fa, mu_a, sigma_a)) < 1e-6 * np.trace(sigma_a)
        mu_b, sigma_b = feature_stats(fb)
        ours = fid_from_features(fa, mu_b, sigma_b)
    # exact reference without any 2048x2048 square root: with centred features A, B the nonzero
    # eigenvalues of S_a S_b are the squared singular values of A B^T / sqrt((n-1)(m-1))
    a, b = fa - fa.mean(0), fb - fb.mean(0)
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(3 * 3)
    direct = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * tr_covmean
    assert ours == pytest.approx(direct, rel=1e-6)
    # pytorch-fid's own formula (scipy sqrtm) on a slice of the same features
    sa, sb = sigma_a[:64, :64], sigma_b[:64, :64]
    covmean = scipy.linalg.sqrtm(sa @ sb).real
    scipy_fd = ((mu_a - mu_b)[:64] ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean)
    with threadpool_limits(1):
        ours_64 = fid_from_features(fa[:, :64], mu_b[:64], sb)
    assert ours_64 == pytest.approx(scipy_fd, rel=1e-5)


def test_fid_input_protocol(inception, tmp_path: Path) -> None:
    """8-bit quantisation, bilinear 299 px, [-1, 1]; torchvision weights load as such."""
    model = inception
    x = _images(2, n=2)
    q = ((x + 1) * 127.5).round() / 255
    q = torch.nn.functional.interpolate(q, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = model.net(2 * q - 1)
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert "299x299" in model.protocol()["resize"]
    tv_model = load_inception(_random_inception("torchvision", tmp_path / "tv.pth"))
    assert tv_model.flavour == "torchvision"


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
    assert "bilinear 299x299" in p["fid"]["resize"] and p["fid"]["reference_samples"] == 3
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
        assert "never downloads" in err
