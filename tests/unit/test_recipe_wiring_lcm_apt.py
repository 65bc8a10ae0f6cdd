"""Recipe wiring, part two: LCM (teacher solver step, target network, shared base, export grid),
APT (who trains on what) and mixed dtypes (bf16 teachers with fp32 or LoRA students). Spies on
the adapter record every network call of the real recipes on tiny teachers."""

from __future__ import annotations

import pytest
import torch

from distillkit.config import TeacherConfig
from distillkit.recipes.gan import TappedBackbone
from distillkit.students import lora_owner, merged_copy, plain_copy
from distillkit.teachers.load import load_teacher
from tests.helpers.recipe_spy import DIRECT, build, grads_of, make_batch, run_role, spy_on, within

FAMILIES = ("sd15", "sdxl", "sana", "sd3", "flux")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one thread is faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_adapter(family: str, dtype: str = "fp32"):
    """An adapter of its own: a shared base puts adapters on the teacher's denoiser itself, which
    must not leak into the session's cached tiny teachers."""
    cfg = TeacherConfig(model_id="tiny", family=family, resolution=32, dtype=dtype)
    return load_teacher(cfg, torch.device("cpu"), smoke=True)


def base_weights(net) -> dict[str, torch.Tensor]:
    return {n: p for n, p in net.named_parameters() if "lora_" not in n}


# ----------------------------------------------------------------------------- LCM


def test_lcm_teacher_step_is_guided_at_one_plus_omega(tiny_adapter, monkeypatch):
    """Dataset latents with their captions: the student at t_start, ONE teacher solver call at
    t_start with per-sample CFG 1 + omega, omega in [w_min, w_max], the target at t_end, the
    grid neighbour of t_start on recipe.grid (which ends at 0)."""
    sd15 = tiny_adapter("sd15")
    recipe = build("lcm", "sd15", sd15, "recipe.w_min=2", "recipe.w_max=6",
                   monkeypatch=monkeypatch, yaml="lcm_lora_sd15")  # fmt: skip
    grid, n = recipe.grid, 4
    assert grid[-1] == 0 and (grid[:-1] > grid[1:]).all()
    first = make_batch(sd15, n=n, images=True)
    spy = spy_on(monkeypatch, sd15, recipe, first.prompts, first.captions)
    for seed in range(3):
        spy.clear()
        _, logs, reached = run_role(recipe, "generator", make_batch(sd15, seed, n, images=True))
        assert reached == {"generator"}
        student, teacher, target = spy.calls
        assert (student.net, teacher.net) == ("generator", "teacher")
        assert student.grad and not teacher.grad and not target.grad
        assert student.text == target.text == ["caption"] * n
        assert teacher.text == ["empty"] * n + ["caption"] * n
        assert torch.equal(teacher.x[n:], student.x) and torch.equal(teacher.t[n:], student.t)
        omega = teacher.guidance - 1
        assert within(omega, 2, 6, closed=True) and omega.unique().numel() == n
        torch.testing.assert_close(logs["omega"], omega.mean())
        index = [grid.tolist().index(t) for t in student.t.tolist()]
        assert torch.equal(target.t, grid[torch.tensor(index) + 1])


@pytest.mark.parametrize("student", ["full", "lora"])
def test_lcm_target_network(tiny_adapter, monkeypatch, student):
    """Full LCM: the target is the EMA copy (its own weights); LCM-LoRA: the student itself
    under no_grad. Either way the loss trains the student only."""
    sd15 = tiny_adapter("sd15")
    yaml = "lcm_sd15" if student == "full" else "lcm_lora_sd15"
    recipe = build("lcm", "sd15", sd15, monkeypatch=monkeypatch, yaml=yaml)
    batch = make_batch(sd15, images=True)
    spy = spy_on(monkeypatch, sd15, recipe, batch.prompts, batch.captions)
    _, _, reached = run_role(recipe, "generator", batch)
    assert reached == {"generator"}
    target = spy.calls[-1]
    assert not target.grad and target.guidance in (None, DIRECT)
    net = recipe.roles["generator"]
    if student == "lora":
        assert recipe.target is None and target.net == "generator"
        return
    assert target.net == "target" and recipe.target is not net
    ptrs = {p.data_ptr() for p in net.parameters()}
    assert not any(p.data_ptr() in ptrs for p in recipe.target.parameters())
    assert not any(p.requires_grad for p in recipe.target.parameters())


def test_lcm_lora_on_the_shared_base(monkeypatch):
    """student.shared_base with a LoRA student: the student's base tensors ARE the teacher's
    (none copied), and the teacher's calls run with the adapter off: their outputs equal a
    plain copy of the teacher's denoiser even once the LoRA is nonzero."""
    adapter = fresh_adapter("sd15")
    teacher_base = base_weights(adapter.denoiser)
    recipe = build("lcm", "sd15", adapter, "student.shared_base=true", "student.lora.rank=4",
                   monkeypatch=monkeypatch, yaml="lcm_lora_sd15")  # fmt: skip
    student = recipe.roles["generator"]
    owner, name = lora_owner(student)
    shared = {p.data_ptr() for p in teacher_base.values()}
    student_base = base_weights(owner)
    assert len(student_base) == len(teacher_base) > 0
    assert sum(p.data_ptr() in shared for p in student_base.values()) == len(teacher_base)
    assert recipe.target is None
    plain = plain_copy(adapter.denoiser)
    with torch.no_grad():  # a trained-looking adapter, so "adapter on" is visible
        for n, p in owner.named_parameters():
            if "lora_B" in n and f".{name}." in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    batch = make_batch(adapter, images=True)
    spy = spy_on(monkeypatch, adapter, recipe, batch.prompts, batch.captions)
    run_role(recipe, "generator", batch)
    student_call, teacher_call, _ = spy.calls
    assert teacher_call.net == "teacher" and student_call.net == "generator"
    raw = type(adapter).forward
    with torch.no_grad():
        as_plain = raw(adapter, plain, teacher_call.x, teacher_call.t, teacher_call.kwargs)
        student_plain = raw(adapter, plain, student_call.x, student_call.t, student_call.kwargs)
    torch.testing.assert_close(teacher_call.out, as_plain, atol=1e-6, rtol=1e-6)
    assert (student_call.out - student_plain).abs().max() > 1e-3  # the adapter was on there


@pytest.mark.parametrize("name", ["dmd2", "sid", "swiftbrush"])
def test_shared_base_calls_run_the_right_adapter(monkeypatch, name):
    """Score recipes on one shared base: every call runs the network it names, i.e. the
    teacher with all adapters off, each role with its own adapter on (replayed on merged
    copies), once every LoRA is nonzero."""
    adapter = fresh_adapter("sd15")
    lora = ("student.type=lora", "student.lora.rank=4", "student.shared_base=true")
    extra = {"dmd2": ["recipe.fake_score=lora", *GAN], "sid": ["recipe.fake_score=lora"]}
    recipe = build(name, "sd15", adapter, *lora, *extra.get(name, ["recipe.lora_rank=4"]),
                   monkeypatch=monkeypatch)  # fmt: skip
    with torch.no_grad():
        for n, p in adapter.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    inner = {
        r: getattr(n, "net", n) if isinstance(n, TappedBackbone) else n
        for r, n in recipe.roles.items()
    }
    nets = {role: merged_copy(net) for role, net in inner.items()}
    nets["teacher"] = plain_copy(adapter.denoiser)
    batch = make_batch(adapter, images=True)
    spy = spy_on(monkeypatch, adapter, recipe, batch.prompts, batch.captions)
    for role in recipe.schedule(0):
        run_role(recipe, role, batch)
    assert {c.net for c in spy.calls} == {"teacher", "generator", "fake_score"}
    raw = type(adapter).forward
    for call in spy.calls:
        with torch.no_grad():
            outs = {k: raw(adapter, net, call.x, call.t, call.kwargs) for k, net in nets.items()}
        errors = {k: (out - call.out).abs().max().item() for k, out in outs.items()}
        assert min(errors, key=errors.get) == call.net and errors[call.net] < 1e-4, errors


@pytest.mark.parametrize("skipping_step", [20, 100])
@pytest.mark.parametrize("family", FAMILIES)
def test_lcm_export_samples_the_training_grid(tiny_adapter, monkeypatch, family, skipping_step):
    """The exported scheduler, set up as export's _check_grids does (adapter.set_grid),
    samples at each shipped step count k in {1, export_steps} k timesteps of recipe.grid."""
    adapter = tiny_adapter(family)
    recipe = build("lcm", family, adapter, f"recipe.skipping_step={skipping_step}",
                   monkeypatch=monkeypatch)  # fmt: skip
    grid = recipe.grid
    assert len(grid) == 1000 // skipping_step + 1
    for k in sorted({1, recipe.export_steps}):
        got = adapter.set_grid(adapter.export_scheduler(), k)
        assert len(got) == k and torch.isin(got, grid).all(), (k, got.tolist(), grid.tolist())


# ----------------------------------------------------------------------------- APT


def _apt(adapter, monkeypatch, *overrides):
    return build("apt", "sd15", adapter, "recipe.head_width=8", *overrides,
                 monkeypatch=monkeypatch)  # fmt: skip


def test_apt_generator_learns_through_the_discriminator(tiny_adapter, monkeypatch):
    """The adversarial loss is differentiated through D (grad on, input requiring grad, real
    captions) into the generator; D's own weights get nothing from it."""
    sd15 = tiny_adapter("sd15")
    recipe = _apt(sd15, monkeypatch)
    batch = make_batch(sd15, images=True)
    spy = spy_on(monkeypatch, sd15, recipe, batch.prompts, batch.captions)
    _, logs, reached = run_role(recipe, "generator", batch)
    assert reached == {"generator"} and set(logs) == {"adv"}
    gen, disc = spy.calls
    assert (gen.net, disc.net) == ("generator", "discriminator")
    assert gen.grad and gen.text == ["caption"] * 2
    assert disc.grad and disc.x_requires_grad and disc.text == ["caption"] * 2
    assert not grads_of(recipe.roles["discriminator"])


@pytest.mark.parametrize("r1_weight", [100.0, 0.0])
def test_apt_discriminator_step(tiny_adapter, monkeypatch, r1_weight):
    """D trains on the generator step's detached sample and the real latents at the same t in
    one call; the approximated-R1 copy perturbs the real inputs only, by r1_sigma * noise."""
    sd15 = tiny_adapter("sd15")
    recipe = _apt(sd15, monkeypatch, f"recipe.r1_weight={r1_weight}")
    n, batch = 2, make_batch(sd15, images=True)
    spy = spy_on(monkeypatch, sd15, recipe, batch.prompts, batch.captions)
    run_role(recipe, "generator", batch)
    spy.clear()
    _, logs, reached = run_role(recipe, "discriminator", batch)
    assert reached == {"discriminator"} and ("r1" in logs) == (r1_weight > 0)
    (call,) = spy.calls
    parts = 3 if r1_weight > 0 else 2
    assert call.net == "discriminator" and call.grad and not call.x_requires_grad
    assert call.text == ["caption"] * n * parts
    fake, real = spy.noise
    assert torch.equal(fake.x0, batch.scratch["x0"])
    assert torch.equal(real.x0, sd15.encode_images(batch.images))
    assert torch.equal(fake.t, real.t) and torch.equal(call.t, fake.t.repeat(parts))
    assert torch.equal(call.x[:n], fake.out) and torch.equal(call.x[n : 2 * n], real.out)
    if r1_weight > 0:
        nudge = call.x[2 * n :] - real.out
        assert 0.5 < nudge.std().item() / recipe.cfg.r1_sigma < 2


def test_apt_discriminator_updates_per_generator(tiny_adapter, monkeypatch):
    recipe = _apt(tiny_adapter("sd15"), monkeypatch,
                  "recipe.discriminator_updates_per_generator=3")  # fmt: skip
    for step in range(10):
        roles = recipe.schedule(step)
        assert ("generator" in roles) == (step % 3 == 0) and "discriminator" in roles


# ----------------------------------------------------------------------------- dtypes

GAN = ("recipe.gan_generator_weight=0.01", "recipe.gan_discriminator_weight=0.01")


def _fp32_finite(module) -> bool:
    grads = grads_of(module)
    return bool(grads) and all(g.dtype == torch.float32 and g.isfinite().all() for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["dmd2", "sid"])
def test_bf16_teacher_fp32_student(tiny_adapter, monkeypatch, name, family):
    """A bf16 teacher's conditioning reaches an fp32 full student without autocast (it used to
    crash: `expected m1 and m2 to have the same dtype`); both roles get fp32, finite gradients
    (SiD's also through the bf16 teacher)."""
    adapter = tiny_adapter(family, dtype="bf16")
    assert adapter.denoiser.dtype == torch.bfloat16
    recipe = build(name, family, adapter, *GAN, monkeypatch=monkeypatch)
    batch = make_batch(adapter, images=True)
    for role in ("generator", "fake_score"):
        assert next(recipe.roles[role].parameters()).dtype == torch.float32
        loss, _, reached = run_role(recipe, role, batch)
        assert torch.isfinite(loss) and reached == {role}
        assert _fp32_finite(recipe.roles[role]), role


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_teacher_lora_roles_on_the_shared_base(monkeypatch, family):
    """LoRA generator and fake score as adapters on a bf16 teacher's own denoiser: the base
    stays bf16, the LoRA masters are fp32 and get finite gradients."""
    adapter = fresh_adapter(family, "bf16")
    recipe = build("dmd2", family, adapter, *GAN, "student.type=lora", "student.lora.rank=4",
                   "recipe.fake_score=lora", "student.shared_base=true",
                   monkeypatch=monkeypatch)  # fmt: skip
    assert all(p.dtype == torch.bfloat16 for p in base_weights(adapter.denoiser).values())
    batch = make_batch(adapter, images=True)
    for role in ("generator", "fake_score"):
        loss, _, reached = run_role(recipe, role, batch)
        assert torch.isfinite(loss) and reached == {role}
        assert _fp32_finite(recipe.roles[role]), role
