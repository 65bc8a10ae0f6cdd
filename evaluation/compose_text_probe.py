"""`python evaluation/compose_text_probe.py`: how far a frozen tiny text encoder's token states
move when one word of a prompt changes, after each text pretraining.

Why: the denoiser reads the prompt only through these states (sd15: the 77 hidden states the
cross-attention sees). Spec v2's compositional teacher never learned the digit; this measures
whether its text pretraining left a digit word anything to read. Figures are the RMS change of
the hidden states for a swapped digit word (and for a swapped colour word) over the single-digit
scene prompts, in units of the states' own scale (they are layer-normed: std 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

import distillkit.benchmark.compose_teachers as compose
from distillkit.benchmark.provenance import git_commit, machine
from distillkit.benchmark.teachers import build_untrained, get_spec
from distillkit.benchmark.text_pretrain import pretrain_text
from distillkit.data.compose import COLOURS, SCENE_SIZE, Scene
from distillkit.data.digits import NUM_CLASSES, prompt_for
from distillkit.registry import get_family
from distillkit.teachers.base import TeacherAdapter

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "evaluation" / "results" / "digits_compose" / "text_token_spread.json"


def _states(adapter: TeacherAdapter, prompt: str) -> Tensor:
    with torch.no_grad():
        cond, _ = adapter.encode_prompts([prompt])
    return cond["encoder_hidden_states"][0]


def _rms_change(states: Tensor, axis: int) -> float:
    """Mean RMS difference between every ordered pair along ``axis`` of (colour, digit, L, D)."""
    moved = states.movedim(axis, 0)
    n = moved.shape[0]
    diff = (moved[:, None] - moved[None]).pow(2).mean((-1, -2)).sqrt()
    return round((diff.sum() / (n * (n - 1) * diff[0, 0].numel())).item(), 4)


def scene_spread(adapter: TeacherAdapter) -> dict[str, float]:
    def prompt(digit: int, colour: str) -> str:
        return Scene("single", ((digit, colour),), 0).prompt()

    states = torch.stack(
        [torch.stack([_states(adapter, prompt(d, c)) for d in range(10)]) for c in COLOURS]
    )
    return {
        "state_std": round(states.std().item(), 3),
        "digit_swap": _rms_change(states, 1),
        "colour_swap": _rms_change(states, 0),
        "digit_effect_shared": shared_share(states),
    }


def shared_share(states: Tensor) -> float:
    """How much of a digit word's effect on the states is the same under every colour word: the
    energy of the colour-averaged digit effect over the mean energy of the per-colour effects.
    1: additive (the denoiser learns ten digit readings); 1 / colours: unrelated across colours
    (it must learn forty). A causal encoder writes "three" after "red" into one state."""
    effect = states - states.mean(1, keepdim=True)  # (colour, digit, L, D): the digit's effect
    shared = effect.mean(0)
    return round((shared.pow(2).sum() / effect.pow(2).sum(dim=(1, 2, 3)).mean()).item(), 4)


def compose_adapter() -> tuple[TeacherAdapter, compose.ComposeSpec]:
    torch.manual_seed(0)
    spec = compose.get_compose_spec("sd15")
    pipe = build_untrained(spec.base, resolution=SCENE_SIZE)
    return get_family("sd15")(pipe, SCENE_SIZE, torch.device("cpu")), spec


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    began = time.perf_counter()
    rows: dict[str, dict] = {}
    adapter, spec = compose_adapter()
    rows["untrained"] = scene_spread(adapter)
    for name, centre in (("v2_centred", True), ("v3_uncentred", False)):
        adapter, spec = compose_adapter()
        losses = compose.pretrain_scene_text(adapter, spec, centre=centre)
        rows[name] = scene_spread(adapter) | losses
    # the plain digits teacher's pretraining, for scale: its prompts, digit swap only
    torch.manual_seed(0)
    plain = get_spec("sd15")
    adapter = get_family("sd15")(build_untrained(plain), 32, torch.device("cpu"))
    losses = pretrain_text(adapter, plain.text_steps, plain.text_lr, plain.text_templates)
    states = torch.stack([_states(adapter, prompt_for(d, 0)) for d in range(NUM_CLASSES)])[None]
    rows["plain_digits_teacher"] = {"digit_swap": _rms_change(states, 1)} | losses
    result = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "machine": machine(),
        "commit": git_commit(),
        "command": "python evaluation/compose_text_probe.py",
        "seconds": round(time.perf_counter() - began, 1),
        "spec": repr(spec),
        "rows": rows,
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
