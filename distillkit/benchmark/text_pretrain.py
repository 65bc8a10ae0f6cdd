"""Semantic pretraining for the random text encoders of the digits teachers.

Why: a random text encoder's embedding of "the number seven, handwritten" is far closer to
"the number two, handwritten" than to "a scanned digit seven" (the template dominates). A
denoiser then needs thousands of steps before it reads the prompt at all. Real teachers get a
semantically trained encoder; ours get a few supervised-contrastive steps on the digit prompts,
through the family's own ``encode_prompts`` (so exactly what the denoiser will see), then are
frozen.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.data.digits import NUM_CLASSES, PROMPT_TEMPLATES, prompt_for
from distillkit.teachers.base import TeacherAdapter


def text_encoders(adapter: TeacherAdapter) -> list[nn.Module]:
    comps = adapter.pipe.components
    return [m for k, m in comps.items() if k.startswith("text_encoder") and m is not None]


def pooled_outputs(cond: dict, mask: Tensor | None = None) -> list[Tensor]:
    """Every text-dependent network input as (N, D); sequences averaged over valid tokens."""
    mask = cond.get("encoder_attention_mask", mask)
    out = []
    for key, value in cond.items():
        if isinstance(value, dict):
            out += pooled_outputs(value, mask)
        elif isinstance(value, Tensor) and value.requires_grad and key != "encoder_attention_mask":
            if value.ndim == 3:
                w = torch.ones(value.shape[:2]) if mask is None else mask.float()
                value = (value * w[..., None]).sum(1) / w.sum(1, keepdim=True)
            out.append(value)
    return out


def supervised_contrastive(
    features: Tensor, labels: Tensor, tau: float = 0.1, centre: bool = True
) -> Tensor:
    """Khosla et al. 2020: same label together, others apart. ``centre`` (the plain digits
    teachers) compares batch-centred features, which leaves the part every prompt shares free
    to grow: under the compositional teachers' six losses it did, and a swapped digit word
    moved the token states 3 % of their scale (0.24 for the plain teacher's)."""
    eye = torch.eye(len(features), dtype=torch.bool)
    z = F.normalize(features - features.mean(0) if centre else features, dim=1)
    log_prob = (z @ z.T / tau).masked_fill(eye, float("-inf")).log_softmax(dim=1)
    positive = (labels[:, None] == labels[None]) & ~eye
    return -(log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1)).mean()


def pretrain_text(
    adapter: TeacherAdapter, steps: int, lr: float, templates_per_digit: int, seed: int = 0
) -> dict:
    """``steps`` contrastive steps on ``templates_per_digit`` prompts per digit, then frozen.

    Call it before the first ``adapter.encode``, which caches embeddings.
    """
    encoders = text_encoders(adapter)
    params = [p for m in encoders for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    templates = range(len(PROMPT_TEMPLATES))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(templates_per_digit)
    for m in encoders:
        m.requires_grad_(True).train()
    losses = []
    for _ in range(steps):
        picks = [rng.sample(templates, templates_per_digit) for _ in range(NUM_CLASSES)]
        prompts = [prompt_for(y, j) for y, js in enumerate(picks) for j in js]
        cond, _ = adapter.encode_prompts(prompts)
        loss = sum(supervised_contrastive(f, labels) for f in pooled_outputs(cond))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for m in encoders:
        m.requires_grad_(False).eval()
    return {"text_loss_first": losses[0], "text_loss_final": losses[-1]} if losses else {}
