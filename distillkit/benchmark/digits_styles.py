"""Style LoRAs for the digits teachers: the benchmark of ``teacher.loras`` and of stacking.

Each style (``data.digits.STYLES``: bold, slanted or back-slanted strokes) is a LoRA the
project trains on its family's digits teacher with the teacher's own diffusion loss, on the
restyled training digits, so that a styled teacher draws the same digits in a look that
``evaluation.metrics.style_statistic`` measures. Saved like a user's LoRA file (the family
pipeline's ``save_lora_weights``, diffusers keys) and cached by spec hash next to the teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from distillkit.benchmark.teachers import RESOLUTION, digits_teacher_dir
from distillkit.data.digits import PROMPT_TEMPLATES, STYLES, load_digits_split, prompt_for, restyle
from distillkit.errors import ConfigError
from distillkit.registry import get_family
from distillkit.teachers.load import cache_root

STYLE_VERSION = 1  # bump when the training code changes what a spec produces
LORA_FILE = "pytorch_lora_weights.safetensors"
# every Linear / Conv of the attention, feed-forward and ResNet blocks: a look (stroke width,
# slant) lives in the convolutions as much as in the attention
TARGETS = {
    "sd15": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
             "ff.net.2", "conv1", "conv2", "conv_shortcut"],
    "sana": ["to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point"],
}  # fmt: skip
TARGETS["sdxl"] = TARGETS["sd15"]


@dataclass(frozen=True)
class StyleSpec:
    family: str
    style: str
    # measured on the sd15 teacher, slant statistic of 200 samples at 25 steps (plain -0.05;
    # the slanted digits through the VAE 0.24): rank 8, 600 steps at 1e-3 reached 0.16, these 0.19
    rank: int = 16
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3  # the teacher's own rate
    warmup: int = 50
    prompt_dropout: float = 0.1  # as the teacher: the styled teacher keeps its guidance
    seed: int = 0
    quick: bool = False  # the quick teacher and a few steps: for tests of the machinery

    def teacher_dir(self) -> Path:
        return digits_teacher_dir(self.family, quick=self.quick)

    def key(self) -> str:
        teacher = self.teacher_dir().name  # the teacher's own spec hash
        text = f"v{STYLE_VERSION}-{teacher}-{json.dumps(asdict(self), sort_keys=True)}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _log(msg: str) -> None:
    print(f"[style {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_style_lora(spec: StyleSpec, out_dir: Path) -> dict:
    """Fit a LoRA on the teacher's denoiser to the restyled training digits; save it."""
    if spec.style not in STYLES:
        raise ConfigError(f"digits styles are {', '.join(STYLES)}, not {spec.style!r}")
    start = time.perf_counter()
    family = get_family(spec.family)
    pipe = DiffusionPipeline.from_pretrained(spec.teacher_dir())
    adapter = family(pipe, RESOLUTION, torch.device("cpu"))
    net = adapter.denoiser
    config = LoraConfig(r=spec.rank, lora_alpha=spec.rank, target_modules=TARGETS[spec.family])
    net.add_adapter(config, adapter_name="style")
    params = [p for name, p in net.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    net.train()
    split = load_digits_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        gen = torch.Generator().manual_seed(spec.seed)
        latents = torch.cat(
            [adapter.encode_images(b) for b in restyle(split.train_images, spec.style).split(256)]
        )
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        sched = get_cosine_schedule_with_warmup(opt, spec.warmup, spec.steps)
        rng, losses = random.Random(spec.seed), []
        for step in range(spec.steps):
            idx = torch.randint(0, len(latents), (spec.batch_size,), generator=gen)
            prompts = [
                prompt_for(int(y), rng.randrange(len(PROMPT_TEMPLATES)))
                for y in split.train_labels[idx]
            ]
            drop = torch.rand(spec.batch_size, generator=gen) < spec.prompt_dropout
            kwargs = adapter.encode(prompts).with_empty_prompts(drop).cond
            x0, t = latents[idx], adapter.sample_t(spec.batch_size, gen)
            noise = torch.randn(x0.shape, generator=gen)
            out = adapter.forward(net, adapter.add_noise(x0, noise, t), t, kwargs)
            loss = F.mse_loss(out, adapter.target(x0, noise, t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 100 == 0:
                _log(f"{spec.family} {spec.style} {step}/{spec.steps} loss {loss.item():.4f}")
    net.eval()
    state = get_peft_model_state_dict(net, adapter_name="style")
    metadata = {
        k: sorted(v) if isinstance(v, set) else v
        for k, v in net.peft_config["style"].to_dict().items()
    }
    attr = family.denoiser_attr
    type(pipe).save_lora_weights(
        out_dir,
        **{f"{attr}_lora_layers": state, f"{attr}_lora_adapter_metadata": metadata},
        safe_serialization=True,
    )
    tail = losses[-50:]
    report = {
        **asdict(spec),
        "loss_first": sum(losses[:50]) / len(losses[:50]),
        "loss_final": sum(tail) / len(tail),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    (out_dir / "distillkit_style.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def style_lora_dir(family: str, style: str, *, quick: bool = False) -> Path:
    """The cached folder with the family's ``style`` LoRA (trained on first use)."""
    spec = StyleSpec(family, style, quick=quick)
    if quick:
        spec = replace(spec, steps=20, batch_size=16, warmup=2)
    out = cache_root() / "digits_styles" / f"{family}-{style}-{spec.key()}"
    if (out / LORA_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    train_style_lora(spec, tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out
