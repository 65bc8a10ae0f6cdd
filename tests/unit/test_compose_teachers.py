"""Compositional digits teachers (quick spec): they train, save, reload through
`digits-compose:<family>`, sample 64 px scenes, and their text encoders tell scenes apart."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from distillkit.benchmark import compose_teachers as C
from distillkit.benchmark.teachers import REPORT_FILE
from distillkit.cli import main
from distillkit.config import TeacherConfig
from distillkit.errors import ConfigError
from distillkit.export.card import export_resolution
from distillkit.teachers.load import load_teacher


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_quick_compose_teacher_trains_and_loads_as_a_card(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path))
    out = C.compose_teacher_dir("sd15", quick=True)
    assert out.parent == tmp_path / "digits-compose" and not list(out.parent.glob("*.tmp*"))
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["loss_final"] < 0.8 * report["loss_first"], report
    assert export_resolution(out) == 64
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red three to the left of a blue seven", num_inference_steps=2, output_type="pt"
    ).images
    assert image.shape == (1, 3, 64, 64)

    result = tmp_path / "compose.json"  # the benchmark through the real CLI
    argv = ["eval", str(out), "--benchmark", "digits-compose", "--scenes", "6", "--steps", "2"]
    assert main([*argv, "--guidance", "2", "--out", str(result)]) == 0
    scores = json.loads(result.read_text())
    assert scores["n"] == 6 and scores["protocol"]["benchmark"] == "digits-compose"
    assert {"all_correct", "digit", "colour", "binding", "position", "count", "fd"} <= set(scores)

    monkeypatch.setattr(C, "train_compose_teacher", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setitem(C.COMPOSE_SPECS, "sd15", C.get_compose_spec("sd15", quick=True))
    cfg = TeacherConfig(model_id="digits-compose:sd15", family="sd15", resolution=64, dtype="fp32")
    adapter = load_teacher(cfg, torch.device("cpu"))
    assert adapter.latent_shape()[-1] == 16  # 64 px through the VAE's 4x downsampling


def _paraphrase_retrieval(adapter) -> float:
    """Share of held scenes whose nearest other prompt (centred, cosine) is its paraphrase."""
    scenes = C.draw_scenes(24, seed=12345)
    prompts = [C.replace(s, template=j).prompt() for s in scenes for j in (0, 1)]
    with torch.no_grad():
        cond, _ = adapter.encode_prompts(prompts)
    h = cond["encoder_hidden_states"].mean(1)
    z = F.normalize(h - h.mean(0), dim=1)
    sim = (z @ z.T).fill_diagonal_(-2.0)
    partner = torch.arange(len(prompts)) ^ 1  # 2k <-> 2k + 1
    return (sim.argmax(1) == partner).float().mean().item()


def test_scene_text_pretraining_pulls_paraphrases_together() -> None:
    """Two templates of one scene ("A left of B", "B right of A") become each other's nearest
    prompt far more often than before pretraining (scenes never seen in pretraining)."""
    spec = C.get_compose_spec("sd15", quick=True)
    spec = C.replace(spec, base=C.replace(spec.base, text_steps=40))
    pipe = C.build_untrained(spec.base, resolution=64)
    adapter = C.get_family("sd15")(pipe, 64, torch.device("cpu"))
    before = _paraphrase_retrieval(adapter)
    C.pretrain_scene_text(adapter, spec)
    after = _paraphrase_retrieval(adapter)
    assert after >= before + 0.3 and after >= 0.6, (before, after)


def test_unknown_compose_family_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="compositional digits teachers exist for"):
        C.get_compose_spec("flux")


def test_denoise_loop_eval_hook_sees_ema_weights_and_changes_nothing() -> None:
    """``on_eval`` runs every ``eval_every`` steps with the EMA weights in the network (at the
    last step they are the weights the loop returns), and a hook that draws random numbers
    leaves the trained weights bit-identical to a run without it."""
    from dataclasses import replace

    from distillkit.benchmark.teachers import build_untrained, denoise_loop
    from distillkit.registry import get_family

    spec = replace(C.get_compose_spec("sd15", quick=True).base, steps=4, batch_size=2, warmup=1)
    seen: list[int] = []
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def train(with_hook: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        adapter = get_family("sd15")(build_untrained(spec), 32, torch.device("cpu"))
        net = adapter.denoiser
        shape = (2, *adapter.latent_shape())
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(1))

        def hook(step: int) -> None:
            torch.randn(1000)  # a hook's sampling must not move the loop's streams
            assert not net.training
            seen.append(step)
            snapshots[step] = {k: v.clone() for k, v in net.state_dict().items()}

        draw = lambda n: (latents, ["a one", "a two"])  # noqa: E731
        gen = torch.Generator().manual_seed(2)
        denoise_loop(adapter, spec, gen, draw, hook if with_hook else None, eval_every=2)
        return net

    plain, hooked = train(False).state_dict(), train(True).state_dict()
    assert seen == [2, 4]
    for key, value in plain.items():
        assert torch.equal(value, hooked[key]), key
        assert torch.equal(snapshots[4][key], value), key  # the EMA weights the loop keeps
    assert any(not torch.equal(snapshots[2][k], hooked[k]) for k in hooked)


def test_denoise_loop_train_text_trains_the_encoders_and_leaves_no_stale_embeddings() -> None:
    """``train_text``: the diffusion loss reaches the text encoder (its weights move; without
    the flag they stay bit-identical), the encoders end frozen in eval mode, and what a hook
    cached mid-run (the EMA encoder of then) is not what ``encode`` returns afterwards."""
    from dataclasses import replace

    from distillkit.benchmark.teachers import build_untrained, denoise_loop
    from distillkit.registry import get_family

    spec = replace(C.get_compose_spec("sd15", quick=True).base, steps=4, batch_size=2, warmup=1)

    def train(train_text: bool):
        torch.manual_seed(0)
        adapter = get_family("sd15")(build_untrained(spec), 32, torch.device("cpu"))
        encoder = adapter.pipe.text_encoder
        before = {k: v.clone() for k, v in encoder.state_dict().items()}
        latents = torch.randn((2, *adapter.latent_shape()), generator=torch.Generator())
        draw = lambda n: (latents, ["a one", "a two"])  # noqa: E731
        hook = lambda step: adapter.encode(["a one"])  # noqa: E731
        gen = torch.Generator().manual_seed(2)
        denoise_loop(adapter, spec, gen, draw, hook, eval_every=2, train_text=train_text)
        moved = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
        return adapter, encoder, moved

    _, _, moved = train(False)
    assert moved == []
    adapter, encoder, moved = train(True)
    assert any("layers" in k for k in moved), moved
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    fresh, _ = adapter.encode_prompts(["a one"])
    cached = adapter.encode(["a one"]).cond
    assert torch.equal(cached["encoder_hidden_states"], fresh["encoder_hidden_states"])


def test_scene_sampler_curriculum_stages_in_order() -> None:
    """The spec's curriculum (white_steps=2, white_mixed_steps=3, single_steps=5): two draws
    of single scenes in white ink (every channel equal), one of every layout in white, two of
    single scenes in the four colours, then every layout in colour; prompts name what was
    drawn."""
    from distillkit.data.compose import COLOURS, INKS, WARMUP_INK
    from distillkit.data.digits import DIGIT_NAMES, load_digits_split

    class Passthrough:  # latents = the rendered images, to read what was drawn
        def encode_images(self, images):
            return images

    split = load_digits_split()
    draw = C.scene_sampler(
        Passthrough(), split, 0, single_steps=5, white_steps=2, white_mixed_steps=3
    )
    for call in range(6):
        images, prompts = draw(6)
        assert images.shape == (6, 3, 64, 64)
        digits = [len([w for w in p.split() if w.strip(",") in DIGIT_NAMES]) for p in prompts]
        grey = torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
        inks = {w for p in prompts for w in p.replace(",", "").split() if w in INKS}
        single = call in (0, 1, 3, 4)
        assert (set(digits) == {1}) == single, (call, prompts)
        if single:  # centred: the left margin stays black
            assert float(images[:, :, :, :16].max()) == -1.0
        if call < 3:
            assert grey and inks == {WARMUP_INK}, (call, prompts)
        else:
            assert not grey and inks and inks <= set(COLOURS), (call, prompts)
    assert any("left" in p or "right" in p for p in prompts)
    assert any("above" in p or "below" in p for p in prompts)


def test_compose_spec_curriculum_reaches_the_vae_and_text_inks() -> None:
    """The shipped spec runs the white-first curriculum, so white joins the inks the VAE's
    scenes and the text pretraining draw from; without it they are the four colours; the quick
    spec keeps a (shorter) curriculum, so tests run that path."""
    from distillkit.data.compose import COLOURS, WARMUP_INK

    spec = C.get_compose_spec("sd15")
    assert 0 < spec.white_steps < spec.single_steps < spec.base.steps
    assert spec.inks() == (*COLOURS, WARMUP_INK)
    assert C.replace(spec, white_steps=0, white_mixed_steps=0).inks() == tuple(COLOURS)
    quick = C.get_compose_spec("sd15", quick=True)
    assert 0 < quick.white_steps < quick.single_steps < quick.base.steps
    assert C.replace(spec, white_steps=0, white_mixed_steps=10).inks() == (*COLOURS, WARMUP_INK)
    # white_mixed_steps keys the cache only where set, so the v4 teachers keep their entries
    assert C.replace(spec, white_mixed_steps=0).key() != C.replace(spec, white_mixed_steps=9).key()
    assert "white_mixed_steps" not in repr(C.replace(spec, white_mixed_steps=0))


def test_attribute_labels_group_equal_values() -> None:
    """One label list per attribute: equal scenes share a label (never each other's negatives),
    a single scene's only slot is both its first and its last."""
    scenes = [
        C.Scene("single", ((3, "red"),)),
        C.Scene("left", ((3, "blue"), (7, "red"))),
        C.Scene("single", ((3, "red"),), template=1),
        C.Scene("above", ((5, "red"), (3, "blue"))),
    ]
    got = [lab.tolist() for lab in C.attribute_labels(scenes)]
    assert got == [
        [0, 1, 0, 2],  # scene
        [0, 1, 0, 2],  # layout
        [0, 0, 0, 1],  # first digit: 3 3 3 5
        [0, 1, 0, 0],  # last digit: 3 7 3 3
        [0, 1, 0, 0],  # first colour
        [0, 0, 0, 1],  # last colour
    ]


def test_compose_tokenizers_keep_scene_words_whole() -> None:
    """The compose teachers' tokenizers have the scene words as whole tokens (every family's
    tokenizer kind); the words key the compose spec and leave the plain specs' keys alone."""
    from distillkit.data.compose import SCENE_WORDS
    from distillkit.teachers.tiny_text import clip_tokenizer, gemma_tokenizer, t5_tokenizer

    prompt = "a red three to the left of a blue seven"  # ten words
    for build in (clip_tokenizer, gemma_tokenizer, t5_tokenizer):
        words = build(words=SCENE_WORDS).tokenize(prompt)
        assert len(words) == 10 and len(build().tokenize(prompt)) > 17, (build, words)
    spec = C.get_compose_spec("sd15")
    pipe = C.build_untrained(C.get_compose_spec("sd15", quick=True).base, resolution=64)
    assert len(pipe.tokenizer.tokenize(prompt)) == 10
    assert "words" not in repr(spec.base.arch)  # the plain teachers' cache keys stay
    no_words = C.replace(spec, base=C.replace(spec.base, arch=C.replace(spec.base.arch, words=())))
    assert no_words.key() != spec.key()


def test_scene_text_pretraining_is_uncentred_by_default(monkeypatch) -> None:
    """Spec v3 on: the per-attribute losses see the raw pooled features (``centre=False``;
    centred, the shared part of the token states grew until a swapped digit word hardly moved
    them: digits_compose/text_token_spread.json)."""
    seen: list[bool] = []
    real = C.supervised_contrastive

    def spy(features, labels, centre=True, **kwargs):
        seen.append(centre)
        return real(features, labels, centre=centre, **kwargs)

    monkeypatch.setattr(C, "supervised_contrastive", spy)
    spec = C.get_compose_spec("sd15", quick=True)
    adapter = C.get_family("sd15")(
        C.build_untrained(spec.base, resolution=64), 64, torch.device("cpu")
    )
    C.pretrain_scene_text(adapter, spec)
    assert seen and not any(seen)
