"""The digits styles of the teacher-LoRA benchmark: each restyle moves its statistic by a known
amount, the style data source serves the restyled digits, and a style LoRA trained by the
project loads as a teacher LoRA and changes the teacher."""

from __future__ import annotations

import pytest
import torch

from distillkit.data.digits import SLANT_SHEAR, STYLES, load_digits_split, restyle
from distillkit.evaluation.metrics import style_statistic


def _line(slope: float, size: int = 32) -> torch.Tensor:
    """One image: a 2-pixel-wide stroke x = slope * y in the statistic's coordinates (x right,
    y up, both in [-1, 1])."""
    ys = torch.linspace(1.0, -1.0, size).view(size, 1)
    xs = torch.linspace(-1.0, 1.0, size).view(1, size)
    ink = ((xs - slope * ys).abs() < 2.0 / size).float()
    return (ink * 2 - 1).expand(1, 3, size, size).clone()


@pytest.mark.parametrize("slope", [0.0, 0.25, -0.4])
def test_slant_statistic_reads_a_known_stroke(slope):
    assert style_statistic(_line(slope), "slant") == pytest.approx(slope, abs=0.02)


def test_bold_is_a_3x3_dilation_and_its_statistic_counts_ink():
    image = -torch.ones(1, 3, 8, 8)
    image[..., 4, 4] = 1.0
    bold = restyle(image, "bold")
    assert int((bold[0, 0] > 0).sum()) == 9 and bold[0, 0, 3:6, 3:6].eq(1).all()
    assert style_statistic(image, "bold") == pytest.approx(1 / 64)
    assert style_statistic(bold, "bold") == pytest.approx(9 / 64)


def test_each_style_moves_its_statistic_on_the_real_digits():
    digits = load_digits_split().heldout_images
    plain = {s: style_statistic(digits, s) for s in STYLES}
    assert style_statistic(restyle(digits, "bold"), "bold") > plain["bold"] + 0.08
    # the shear of x by SLANT_SHEAR * y, minus what the sampling grid's aspect takes off
    slanted = style_statistic(restyle(digits, "slant"), "slant")
    assert slanted - plain["slant"] == pytest.approx(SLANT_SHEAR, abs=0.05)
    back = style_statistic(restyle(digits, "backslant"), "backslant")
    assert back - plain["slant"] == pytest.approx(-SLANT_SHEAR, abs=0.05)
    with pytest.raises(ValueError, match="unknown digits style"):
        restyle(digits, "italic")


def test_the_style_data_source_serves_restyled_digits():
    from distillkit.config import DataConfig
    from distillkit.data.sources import load_train_data
    from distillkit.errors import ConfigError

    plain = load_train_data(DataConfig(prompts="digits", images="digits"), 32, False, True)
    bold = load_train_data(DataConfig(prompts="digits", images="digits:bold"), 32, False, True)
    assert bold.prompts == plain.prompts
    assert torch.equal(bold.images, restyle(plain.images, "bold"))
    with pytest.raises(ConfigError, match="data.images=digits:italic"):
        load_train_data(DataConfig(images="digits:italic"), 32, False, True)


def test_a_style_lora_loads_on_its_teacher_and_changes_it(tmp_path):
    from distillkit.benchmark.digits_styles import LORA_FILE, style_lora_dir
    from distillkit.benchmark.teachers import digits_teacher_dir
    from distillkit.config import TeacherConfig
    from distillkit.teachers.load import load_teacher

    folder = style_lora_dir("sd15", "slant", quick=True)
    written = (folder / LORA_FILE).stat().st_mtime_ns
    assert style_lora_dir("sd15", "slant", quick=True) == folder  # cached, not retrained
    assert (folder / LORA_FILE).stat().st_mtime_ns == written
    teacher = str(digits_teacher_dir("sd15", quick=True))

    def weights(loras):
        cfg = TeacherConfig(model_id=teacher, family="sd15", resolution=32, loras=loras)
        return load_teacher(cfg, torch.device("cpu")).denoiser.state_dict()

    plain, styled = weights([]), weights([{"path": str(folder)}])
    changed = [k for k in plain if not torch.equal(plain[k], styled[k])]
    assert changed and all(
        ".conv" in k or ".to_" in k or "proj" in k or "ff." in k for k in changed
    )
