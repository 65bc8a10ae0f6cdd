"""teacher.loras: a user's LoRA files (diffusers and kohya formats) fused into the teacher with
the known weight change, their factors kept, and one stacked LoRA file that reloads as the sum."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from distillkit.config import TeacherConfig
from distillkit.errors import ConfigError, ExportError
from distillkit.teachers.load import load_teacher, tiny_teacher_dir
from distillkit.teachers.loras import lora_file_state, stack
from tests.helpers.lora_files import linear_layers, write_style_lora

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base_dir():
    return tiny_teacher_dir("sd15", 32)


def _teacher(base_dir, loras, dtype="fp32"):
    cfg = TeacherConfig(
        model_id=str(base_dir), family="sd15", resolution=32, dtype=dtype, loras=loras
    )
    return load_teacher(cfg, CPU)


@pytest.fixture(scope="module")
def plain(base_dir):
    return _teacher(base_dir, [])


def _targets(net) -> list[str]:
    return linear_layers(net, "attn1.to_q")[:2] + linear_layers(net, "ff.net.2")[:1]


def _weights(net) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_lora_file_changes_the_teacher_by_its_known_weight_change(tmp_path, base_dir, plain, fmt):
    file = tmp_path / "style.safetensors"
    deltas = write_style_lora(plain.denoiser, file, _targets(plain.denoiser), fmt=fmt, alpha=1.0)
    styled = _teacher(base_dir, [{"path": str(file), "scale": 0.5}])
    before, after = _weights(plain.denoiser), _weights(styled.denoiser)
    assert before.keys() == after.keys()  # fused: no LoRA layers are left in the network
    for key in before:
        module = key.removesuffix(".weight")
        if module in deltas:  # kohya: alpha / rank = 0.5 folded in; diffusers: scale 1
            want = before[key] + 0.5 * deltas[module]
            torch.testing.assert_close(after[key], want, rtol=1e-5, atol=1e-6)
            assert (after[key] - before[key]).abs().max() > 1e-2
        else:
            assert torch.equal(after[key], before[key]), key
    assert set(styled.loras.factors) == set(deltas)
    for module, (down, up) in styled.loras.factors.items():
        torch.testing.assert_close(up @ down, 0.5 * deltas[module], rtol=1e-5, atol=1e-6)
    # the published base comes back for the export's LoRA-file check
    assert all(torch.equal(v, before[k]) for k, v in _weights(styled.loras.reload_base()).items())


def test_two_loras_on_one_layer_add_up_and_stack_their_ranks(tmp_path, base_dir, plain):
    targets = _targets(plain.denoiser)
    d1 = write_style_lora(plain.denoiser, tmp_path / "a.safetensors", targets, fmt="kohya")
    d2 = write_style_lora(
        plain.denoiser, tmp_path / "b.safetensors", targets[:1], fmt="diffusers", seed=1
    )
    styled = _teacher(
        base_dir,
        [
            {"path": str(tmp_path / "a.safetensors"), "scale": 0.5, "name": "ink"},
            {"path": str(tmp_path / "b.safetensors"), "scale": -1.0, "name": "slant"},
        ],
    )
    first = targets[0]
    down, up = styled.loras.factors[first]
    assert down.shape[0] == 4  # rank 2 + rank 2, side by side
    torch.testing.assert_close(up @ down, 0.5 * d1[first] - d2[first], rtol=1e-5, atol=1e-6)
    before, after = _weights(plain.denoiser), _weights(styled.denoiser)
    torch.testing.assert_close(
        after[f"{first}.weight"], before[f"{first}.weight"] + 0.5 * d1[first] - d2[first]
    )


def test_stacked_lora_file_reloads_as_the_sum_of_its_parts(tmp_path, plain):
    """Layers of different total rank go through rank_pattern / alpha_pattern: every layer at
    scale 1 when diffusers reloads the file."""
    net, gen = plain.denoiser, torch.Generator().manual_seed(3)
    q, ff = _targets(net)[0], _targets(net)[2]
    shape = {name: dict(net.named_modules())[name].weight.shape for name in (q, ff)}

    def factors(names, rank):
        return {
            n: (
                torch.randn(rank, shape[n][1], generator=gen),
                torch.randn(shape[n][0], rank, generator=gen),
            )
            for n in names
        }

    style, student = factors([q, ff], 2), factors([q], 8)
    tensors, metadata = lora_file_state(stack(style, student))
    assert metadata["r"] == 2 or metadata["rank_pattern"]
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=tensors, unet_lora_adapter_metadata=metadata
    )
    pipe = StableDiffusionPipeline(**{**plain.pipe.components, "unet": copy.deepcopy(net)})
    pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    before, after = _weights(net), _weights(pipe.unet)
    for name, parts in ((q, [style[q], student[q]]), (ff, [style[ff]])):
        want = before[f"{name}.weight"] + sum(up @ down for down, up in parts)
        torch.testing.assert_close(after[f"{name}.weight"], want, rtol=1e-4, atol=1e-5)


def _error(base_dir, loras, smoke=False) -> str:
    cfg = TeacherConfig(model_id=str(base_dir), family="sd15", resolution=32, loras=loras)
    with pytest.raises(ConfigError) as info:
        load_teacher(cfg, CPU, smoke=smoke)
    return str(info.value)


def test_missing_file(base_dir, tmp_path):
    err = _error(base_dir, [{"path": str(tmp_path / "nope.safetensors")}])
    assert "teacher.loras[0].path" in err and "does not exist" in err


def test_a_lora_of_another_family(base_dir, plain, tmp_path):
    file = tmp_path / "flux.safetensors"
    write_style_lora(plain.denoiser, file, _targets(plain.denoiser), fmt="diffusers")
    renamed = tmp_path / "renamed.safetensors"
    from safetensors.torch import load_file

    save_file(
        {k.replace("unet.", "transformer.x."): v for k, v in load_file(file).items()}, renamed
    )
    err = _error(base_dir, [{"path": str(renamed)}])
    assert "teacher.loras[0]" in err


def test_text_encoder_weights_are_refused(base_dir, plain, tmp_path):
    file = tmp_path / "te.safetensors"
    layer = "text_model.encoder.layers.0.self_attn.q_proj"
    width = plain.pipe.text_encoder.config.hidden_size
    tensors = {
        f"text_encoder.{layer}.lora_A.weight": torch.zeros(2, width),
        f"text_encoder.{layer}.lora_B.weight": torch.zeros(width, 2),
    }
    write_style_lora(
        plain.denoiser, tmp_path / "unet.safetensors", _targets(plain.denoiser)[:1], fmt="diffusers"
    )
    from safetensors.torch import load_file

    save_file({**load_file(tmp_path / "unet.safetensors"), **tensors}, file)
    err = _error(base_dir, [{"path": str(file)}])
    assert "text_encoder weights" in err and "teacher.loras[0]" in err


def test_pickle_lora_files_are_not_loaded(base_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"unet.x.lora_A.weight": torch.zeros(1)}, folder / "pytorch_lora_weights.bin")
    err = _error(base_dir, [{"path": str(folder)}])
    assert "teacher.loras[0]" in err and "pickle LoRA files are not loaded" in err


def test_smoke_opens_the_file_and_says_what_it_substitutes(base_dir, plain, tmp_path):
    file = tmp_path / "style.safetensors"
    write_style_lora(plain.denoiser, file, _targets(plain.denoiser), fmt="kohya")
    cfg = TeacherConfig(
        model_id="any/hub-id",
        family="sd15",
        resolution=512,
        loras=[{"path": str(file), "scale": 0.7}],
    )
    teacher = load_teacher(cfg, CPU, smoke=True)
    (note,) = teacher.loras.notes
    assert "opened (9 tensors)" in note and "random rank-4 LoRA at scale 0.7 instead" in note
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    err = _error(base_dir, [{"path": str(tmp_path / "broken.safetensors")}], smoke=True)
    assert "not a readable safetensors file" in err


@pytest.fixture(scope="module")
def styled(base_dir, plain, tmp_path_factory):
    file = tmp_path_factory.mktemp("style") / "style.safetensors"
    write_style_lora(plain.denoiser, file, _targets(plain.denoiser), fmt="kohya")
    return _teacher(base_dir, [{"path": str(file), "scale": 0.8}])


@pytest.mark.parametrize(
    ("recipe", "yaml"),
    [
        ("dmd2", "dmd2_sd15"),
        ("dmd2", "dmd2_sdxl_lora"),
        ("sid", "sid_sd15"),
        ("swiftbrush", "swiftbrush_sd15"),
        ("lcm", "lcm_sd15"),
        ("lcm", "lcm_lora_sd15"),
        ("apt", "apt_sd15"),
    ],
)
def test_every_recipe_starts_from_base_plus_style(styled, plain, recipe, yaml, monkeypatch):
    """No recipe reaches past the adapter's denoiser, so each generator (full copy or LoRA on
    it) starts at the fused base + style, not at the published base."""
    from distillkit.students import merged_copy
    from tests.helpers.recipe_spy import build

    built = build(recipe, "sd15", styled, monkeypatch=monkeypatch, yaml=yaml)
    start = _weights(merged_copy(built.roles[built.generator_role]))
    want, base = _weights(styled.denoiser), _weights(plain.denoiser)
    assert start.keys() == want.keys()
    assert all(torch.equal(start[k], want[k].to(start[k].dtype)) for k in want)
    assert any(not torch.equal(want[k], base[k]) for k in want)


def test_the_export_check_catches_a_lora_file_without_the_style(styled, tmp_path, monkeypatch):
    """The file must carry the style: without it, reloaded on the published base it differs
    from what training saw, and the export stops (both checks in fp32: max abs 1e-4)."""
    import distillkit.export.pipeline as export_module
    from distillkit.config import LoraConfigSection
    from distillkit.export import export_student
    from distillkit.students import trainable_copy

    student = trainable_copy(styled.denoiser, "lora", LoraConfigSection(rank=4, alpha=4.0))
    report = export_student(styled, student, tmp_path / "good", steps=1)
    assert report.lora_max_abs_diff <= 1e-4 and report.pipeline_max_abs_diff <= 1e-4
    real = export_module.lora_state
    monkeypatch.setattr(export_module, "lora_state", lambda net, loras: real(net, None))
    with pytest.raises(ExportError, match="load_lora_weights differs"):
        export_student(styled, student, tmp_path / "bad", steps=1)
