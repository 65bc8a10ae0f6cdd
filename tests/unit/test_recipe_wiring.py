"""Recipe wiring: which network each loss calls, at which t, with which guidance and text, and
where its gradient goes (DMD2, SiD, SwiftBrush). The math itself is tested in *_math.py; here
spies on the adapter record every network call of the real recipes on tiny SD1.5 teachers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distillkit.errors import ConfigError
from distillkit.recipes.gan import unwrap
from distillkit.students import lora_owner
from tests.helpers.recipe_spy import DIRECT, build, make_batch, run_role, spy_on, within

T = 1000  # the tiny teachers' num_train_timesteps
REPO = Path(__file__).resolve().parents[2]
NO_GAN = ("recipe.gan_generator_weight=0", "recipe.gan_discriminator_weight=0")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one thread is faster than two contended ones (measured: 0.05 s vs
    1-4 s per loss while other jobs share the 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sd15(tiny_adapter):
    return tiny_adapter("sd15")


def _unguided(call) -> bool:
    return call.guidance in (None, 1.0, DIRECT)


# ----------------------------------------------------------------------------- DMD2


def test_dmd2_generator_step_guides_the_teacher_only(sd15, monkeypatch):
    """real_guidance_scale reaches the teacher's score, the fake score runs unguided on the
    prompts; both see the same x_t at one t in [min_t, max_t] T, without gradients; the DM
    loss's gradient reaches the generator's parameters and nothing else."""
    recipe = build("dmd2", "sd15", sd15, *NO_GAN, "recipe.real_guidance_scale=3.5",
                   "recipe.min_t=0.3", "recipe.max_t=0.5", monkeypatch=monkeypatch)  # fmt: skip
    spy = spy_on(monkeypatch, sd15, recipe, make_batch(sd15, n=4).prompts)
    seen = []
    for seed in range(4):
        spy.clear()
        _, logs, reached = run_role(recipe, "generator", make_batch(sd15, seed, n=4))
        assert reached == {"generator"} and set(logs) == {"dm"}
        gen, fake, real = spy.calls
        assert (gen.net, fake.net, real.net) == ("generator", "fake_score", "teacher")
        assert gen.grad and gen.text == ["prompt"] * 4
        assert torch.equal(gen.t, sd15.generator_timesteps(1).expand(4))
        assert _unguided(fake) and fake.text == ["prompt"] * 4
        assert real.guidance == 3.5 and real.text == ["empty"] * 4 + ["prompt"] * 4
        for call in (fake, real):
            assert not call.grad and not call.x_requires_grad
        assert torch.equal(real.x[4:], fake.x) and torch.equal(real.t[4:], fake.t)
        seen += fake.t.tolist()
    assert all(300 <= t < 500 for t in seen) and len(set(seen)) > 4


def test_dmd2_fake_score_trains_on_the_detached_generator_sample(sd15, monkeypatch):
    """The fake score's denoising loss noises the generator step's own x0 (batch.scratch), not
    a new draw, at t in [0, T) with the prompts; its gradient never reaches the generator."""
    recipe = build("dmd2", "sd15", sd15, *NO_GAN, monkeypatch=monkeypatch)
    batch = make_batch(sd15, n=4)
    spy = spy_on(monkeypatch, sd15, recipe, batch.prompts)
    run_role(recipe, "generator", batch)
    assert torch.equal(batch.scratch["x0"], spy.generated[0])
    assert not batch.scratch["x0"].requires_grad
    spy.clear()
    _, logs, reached = run_role(recipe, "fake_score", batch)
    assert reached == {"fake_score"} and set(logs) == {"denoise"}
    (call,) = spy.calls
    assert call.net == "fake_score" and call.grad and not call.x_requires_grad
    assert call.guidance == DIRECT and call.text == ["prompt"] * 4
    (noised,) = spy.noise
    assert torch.equal(noised.x0, batch.scratch["x0"])
    assert torch.equal(call.x, noised.out.detach()) and torch.equal(call.t, noised.t)
    assert within(call.t, 0, T)
    # alone (no generator step before it) the fake step draws its own sample without grad
    spy.clear()
    run_role(recipe, "fake_score", make_batch(sd15, 1, n=4))
    assert spy.order() == ["generator", "fake_score"] and not spy.calls[0].grad


@pytest.mark.parametrize("every", [1, 3, 5])
def test_dmd2_two_time_scale_rule(sd15, monkeypatch, every):
    """schedule(step) trains the generator exactly on every k-th step, the fake score always."""
    recipe = build("dmd2", "sd15", sd15, *NO_GAN, f"recipe.fake_updates_per_generator={every}",
                   monkeypatch=monkeypatch)  # fmt: skip
    for step in range(10):
        roles = recipe.schedule(step)
        assert ("generator" in roles) == (step % every == 0), step
        assert "fake_score" in roles and set(roles) <= {"generator", "fake_score"}


def test_dmd2_refuses_a_guided_fake_score():
    """The fake score is trained on prompts only, so config validation refuses its CFG."""
    with pytest.raises(ConfigError, match="fake_guidance_scale"):
        build("dmd2", "sd15", None, "recipe.fake_guidance_scale=2")


def test_dmd2_gan_generator_term_reads_the_fake_score_at_a_fresh_t(sd15, monkeypatch):
    """With a GAN term the logits come from the fake score's head on the generated x0 noised
    afresh (another t in [0, T), other noise than the DM call's), differentiated through."""
    recipe = build("dmd2", "sd15", sd15, "recipe.gan_generator_weight=0.5",
                   "recipe.min_t=0.3", "recipe.max_t=0.5", monkeypatch=monkeypatch)  # fmt: skip
    head_rows = []
    hook = (
        unwrap(recipe.roles["fake_score"])
        .heads[0]
        .register_forward_hook(lambda _m, inputs, _o: head_rows.append(inputs[0].shape[0]))
    )
    batch = make_batch(sd15, n=4, images=True)
    spy = spy_on(monkeypatch, sd15, recipe, batch.prompts, batch.captions)
    try:
        _, logs, reached = run_role(recipe, "generator", batch)
    finally:
        hook.remove()
    assert reached == {"generator"} and set(logs) == {"dm", "gan"}
    assert spy.order() == ["generator", "fake_score", "teacher", "fake_score"]
    dm, gan = spy.of("fake_score")
    assert head_rows == [4]  # only the GAN call taps the head
    assert gan.grad and gan.x_requires_grad and gan.text == ["prompt"] * 4
    assert within(gan.t, 0, T) and not torch.equal(gan.t, dm.t)
    dm_noise, gan_noise = spy.noise
    assert torch.equal(dm_noise.x0, gan_noise.x0)  # the same generated sample ...
    assert not torch.equal(dm_noise.eps, gan_noise.eps)  # ... noised afresh
    assert torch.equal(gan.x, gan_noise.out.detach()) and torch.equal(gan.t, gan_noise.t)


def test_dmd2_gan_fake_step_is_one_batched_call(sd15, monkeypatch):
    """The fake step with a GAN term: one fake-score call carrying the denoising input, the
    detached generated sample and the real latents (real captions), each at its own t."""
    recipe = build("dmd2", "sd15", sd15, monkeypatch=monkeypatch)  # the YAML's GAN weights
    batch = make_batch(sd15, n=2, images=True)
    spy = spy_on(monkeypatch, sd15, recipe, batch.prompts, batch.captions)
    run_role(recipe, "generator", batch)
    spy.clear()
    _, logs, reached = run_role(recipe, "fake_score", batch)
    assert reached == {"fake_score"} and set(logs) == {"denoise", "disc"}
    (call,) = spy.calls
    assert call.net == "fake_score" and call.grad and not call.x_requires_grad
    assert call.text == ["prompt"] * 4 + ["caption"] * 2
    denoise, fake, real = spy.noise
    assert torch.equal(denoise.x0, batch.scratch["x0"])
    assert torch.equal(fake.x0, batch.scratch["x0"])
    assert torch.equal(real.x0, sd15.encode_images(batch.images))
    assert torch.equal(call.x, torch.cat([denoise.out, fake.out, real.out]))
    assert torch.equal(call.t, torch.cat([denoise.t, fake.t, real.t]))
    assert not torch.equal(denoise.t, fake.t) and not torch.equal(denoise.eps, fake.eps)


def test_dmd2_backward_simulation(sd15, monkeypatch):
    """generator_steps=4: the generator walks adapter.generator_timesteps(4) from the top to a
    random stopping step, without gradients except at the last call, which the loss reaches."""
    recipe = build("dmd2", "sd15", sd15, *NO_GAN, "recipe.generator_steps=4",
                   monkeypatch=monkeypatch)  # fmt: skip
    grid = sd15.generator_timesteps(4)
    spy = spy_on(monkeypatch, sd15, recipe, make_batch(sd15).prompts)
    lengths = set()
    for seed in range(8):
        spy.clear()
        _, _, reached = run_role(recipe, "generator", make_batch(sd15, seed))
        assert reached == {"generator"}
        calls = spy.of("generator")
        lengths.add(len(calls))
        for i, call in enumerate(calls):
            assert torch.equal(call.t, grid[i].expand(2))
            assert call.grad == (i == len(calls) - 1)
    assert len(lengths) > 1 and lengths <= {1, 2, 3, 4}


@pytest.mark.parametrize("name", ["dmd2", "sid"])
def test_one_student_for_several_step_counts(sd15, monkeypatch, name):
    """student.step_counts=[1, 2, 4]: each generator draw runs the grid of the count the
    batch's stream picks (replayed here through the same Batch calls), up to the stopping step
    the stream picks next, with the gradient at the last call only."""
    from distillkit.recipes.base import Batch

    extra = NO_GAN if name == "dmd2" else ()
    recipe = build(name, "sd15", sd15, *extra, "student.step_counts=[1,2,4]",
                   monkeypatch=monkeypatch)  # fmt: skip
    assert recipe.step_counts == (1, 2, 4) and recipe.export_steps == 4
    spy = spy_on(monkeypatch, sd15, recipe, make_batch(sd15).prompts)
    seen = set()
    for seed in range(12):
        batch = make_batch(sd15, seed)
        replay = Batch(batch.prompts, None, None, torch.Generator().set_state(
            batch.generator.get_state()))  # fmt: skip
        k = (1, 2, 4)[replay.choice(3)]  # the count, then the noise, then the stopping step
        replay.randn((2, *sd15.latent_shape()), sd15.device)
        last = replay.choice(k) if k > 1 else 0
        spy.clear()
        run_role(recipe, "generator", batch)
        calls = spy.of("generator")
        grid = sd15.generator_timesteps(k)
        assert len(calls) == last + 1, (seed, k, last)
        for i, call in enumerate(calls):
            assert torch.equal(call.t, grid[i].expand(2))
            assert call.grad == (i == len(calls) - 1)
        seen.add(k)
    assert seen == {1, 2, 4}


def test_step_counts_are_refused_where_a_recipe_trains_one():
    from distillkit.config import load_config

    base = REPO / "recipes" / "swiftbrush_sd15.yaml"
    with pytest.raises(ConfigError, match="recipe 'swiftbrush' trains one step count"):
        load_config(base, ["student.step_counts=[1,4]"])
    with pytest.raises(ConfigError, match="both set the step count"):
        load_config(REPO / "recipes" / "dmd2_sd15.yaml",
                    ["student.step_counts=[1,4]", "recipe.generator_steps=4"])  # fmt: skip


# ----------------------------------------------------------------------------- SiD

LSG = ("recipe.real_guidance_scale=3.0", "recipe.fake_guidance_scale=2.0",
       "recipe.fake_train_guidance_scale=1.5", "recipe.min_t=0.3", "recipe.max_t=0.5")  # fmt: skip


def test_sid_schedule_refreshes_the_fake_score_first(sd15, monkeypatch):
    recipe = build("sid", "sd15", sd15, monkeypatch=monkeypatch)
    assert all(recipe.schedule(step) == ["fake_score", "generator"] for step in range(5))


def test_sid_lsg_kappas_reach_the_right_networks(sd15, monkeypatch):
    """LSG: teacher at kappa_4, fake score at kappa_2 in the generator loss and at kappa_1 in its
    own, which drops prompts (fake_prompt_dropout) inside the guided call; t in [min_t, max_t]."""
    recipe = build("sid", "sd15", sd15, *LSG, "recipe.fake_prompt_dropout=0.5",
                   monkeypatch=monkeypatch)  # fmt: skip
    n = 4
    spy = spy_on(monkeypatch, sd15, recipe, make_batch(sd15, n=n).prompts)
    cfg_text = ["empty"] * n + ["prompt"] * n
    dropped = set()
    for seed in range(3):
        spy.clear()
        run_role(recipe, "generator", make_batch(sd15, seed, n=n))
        gen, real, fake = spy.calls
        assert (gen.net, real.net, fake.net) == ("generator", "teacher", "fake_score")
        assert real.guidance == 3.0 and fake.guidance == 2.0
        assert real.text == fake.text == cfg_text
        assert within(real.t, 300, 500) and torch.equal(real.t, fake.t)
        spy.clear()
        run_role(recipe, "fake_score", make_batch(sd15, seed, n=n))
        gen, fake = spy.calls
        assert gen.net == "generator" and not gen.grad
        assert fake.net == "fake_score" and fake.guidance == 1.5
        assert fake.text[:n] == ["empty"] * n and set(fake.text[n:]) <= {"empty", "prompt"}
        assert within(fake.t, 300, 500)
        dropped.update(fake.text[n:])
    assert dropped == {"empty", "prompt"}  # some prompts dropped, some kept


def test_sid_unguided_fake_score_keeps_every_prompt(sd15, monkeypatch):
    """With every kappa 1 nothing is guided: no prompt dropout, whatever fake_prompt_dropout."""
    ones = ("recipe.real_guidance_scale=1", "recipe.fake_guidance_scale=1",
            "recipe.fake_train_guidance_scale=1", "recipe.fake_prompt_dropout=0.9")  # fmt: skip
    recipe = build("sid", "sd15", sd15, *ones, monkeypatch=monkeypatch)
    spy = spy_on(monkeypatch, sd15, recipe, make_batch(sd15, n=4).prompts)
    run_role(recipe, "fake_score", make_batch(sd15, n=4))
    run_role(recipe, "generator", make_batch(sd15, n=4))
    for call in spy.calls:
        assert _unguided(call) and call.text == ["prompt"] * 4, call.net


def test_sid_zero_cfg(sd15, monkeypatch):
    """Zero-CFG: the teacher unguided on the prompts, the fake score only ever on the empty
    prompt (in its own loss and in the generator's)."""
    recipe = build("sid", "sd15", sd15, "recipe.guidance=zero_cfg",
                   "recipe.real_guidance_scale=null", "recipe.fake_guidance_scale=null",
                   monkeypatch=monkeypatch)  # fmt: skip
    spy = spy_on(monkeypatch, sd15, recipe, make_batch(sd15).prompts)
    run_role(recipe, "fake_score", make_batch(sd15))
    run_role(recipe, "generator", make_batch(sd15))
    assert spy.order() == ["generator", "fake_score", "generator", "teacher", "fake_score"]
    (real,) = spy.of("teacher")
    assert _unguided(real) and real.text == ["prompt"] * 2
    for fake in spy.of("fake_score"):
        assert _unguided(fake) and fake.text == ["empty"] * 2


def test_sid_generator_gradient_flows_through_both_scores(sd15, monkeypatch):
    """Unlike DMD2, SiD differentiates through both score networks' inputs (grad on, x_t
    requiring grad), but its loss still reaches only the generator's parameters."""
    recipe = build("sid", "sd15", sd15, *LSG, monkeypatch=monkeypatch)
    spy = spy_on(monkeypatch, sd15, recipe, make_batch(sd15).prompts)
    _, logs, reached = run_role(recipe, "generator", make_batch(sd15))
    assert reached == {"generator"} and set(logs) == {"sid"}
    for name in ("teacher", "fake_score"):
        (call,) = spy.of(name)
        assert call.grad and call.x_requires_grad, name


def test_sid_fake_score_trains_on_a_detached_sample(sd15, monkeypatch):
    """The fake score's loss: a generator draw without gradients, noised at t in [min_t, max_t];
    its gradient reaches only the fake score."""
    recipe = build("sid", "sd15", sd15, *LSG, monkeypatch=monkeypatch)
    spy = spy_on(monkeypatch, sd15, recipe, make_batch(sd15).prompts)
    _, logs, reached = run_role(recipe, "fake_score", make_batch(sd15))
    assert reached == {"fake_score"} and set(logs) == {"denoise"}
    gen, fake = spy.calls
    assert not gen.grad and fake.grad and not fake.x_requires_grad
    (noised,) = spy.noise
    assert torch.equal(noised.x0, spy.generated[0])
    assert within(fake.t, 300, 500)


# ----------------------------------------------------------------------------- SwiftBrush


@pytest.mark.parametrize("fake_scale", [None, 2.0])
def test_swiftbrush_generator_step(sd15, monkeypatch, fake_scale):
    """VSD: teacher at real_guidance_scale, LoRA score at fake_guidance_scale (None: the real
    one), both on the detached sample under no_grad; t in [min_t, max_t] T."""
    fake_opt = "null" if fake_scale is None else fake_scale
    recipe = build("swiftbrush", "sd15", sd15, "recipe.real_guidance_scale=3.0",
                   f"recipe.fake_guidance_scale={fake_opt}", "recipe.lora_rank=4",
                   "recipe.min_t=0.3", "recipe.max_t=0.5", monkeypatch=monkeypatch)  # fmt: skip
    spy = spy_on(monkeypatch, sd15, recipe, make_batch(sd15).prompts)
    _, logs, reached = run_role(recipe, "generator", make_batch(sd15))
    assert reached <= {"generator"} and set(logs) == {"vsd"}  # zero at init: LoRA B = 0
    gen, real, fake = spy.calls
    assert (gen.net, real.net, fake.net) == ("generator", "teacher", "fake_score")
    assert gen.grad and real.guidance == 3.0 and fake.guidance == (fake_scale or 3.0)
    for call in (real, fake):
        assert not call.grad and not call.x_requires_grad
        assert call.text == ["empty"] * 2 + ["prompt"] * 2
        assert within(call.t, 300, 500)


def test_swiftbrush_fake_score_uses_the_generator_samples(sd15, monkeypatch):
    """The LoRA's loss noises the generator step's detached samples (scratch) at t in [0, T),
    with the empty prompt for the dropped fraction; only the LoRA weights get gradients."""
    recipe = build("swiftbrush", "sd15", sd15, "recipe.lora_rank=4", "recipe.min_t=0.6",
                   "recipe.fake_prompt_dropout=0.5", monkeypatch=monkeypatch)  # fmt: skip
    n, texts, ts = 4, set(), []
    spy = spy_on(monkeypatch, sd15, recipe, make_batch(sd15, n=n).prompts)
    for seed in range(3):
        batch = make_batch(sd15, seed, n=n)
        run_role(recipe, "generator", batch)
        spy.clear()
        _, _, reached = run_role(recipe, "fake_score", batch)
        assert reached == {"fake_score"}
        (call,) = spy.calls
        assert call.net == "fake_score" and call.guidance == DIRECT and call.grad
        assert not call.x_requires_grad
        assert torch.equal(spy.noise[0].x0, batch.scratch["x0"])
        texts.update(call.text)
        ts += call.t.tolist()
    assert texts == {"empty", "prompt"}
    assert all(0 <= t < T for t in ts) and min(ts) < 600  # not the generator's [min_t, max_t]
    trainable = [n for n, p in recipe.roles["fake_score"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_swiftbrush_fake_score_is_lora_on_the_teachers_base(sd15, monkeypatch):
    """Every base weight of the LoRA fake score equals the teacher's (peft's base_layer)."""
    recipe = build("swiftbrush", "sd15", sd15, "recipe.lora_rank=4", monkeypatch=monkeypatch)
    owner, name = lora_owner(recipe.roles["fake_score"])
    assert owner.peft_config[name].r == 4
    base = {
        n.replace(".base_layer", ""): p for n, p in owner.named_parameters() if "lora_" not in n
    }
    teacher = dict(sd15.denoiser.named_parameters())
    assert base.keys() == teacher.keys()
    assert all(torch.equal(base[k], teacher[k]) for k in teacher)
