"""Image helpers shared by evaluation and training (sample grids): leaf code, torch and PIL only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when a grid is made: the CLI's help stays fast
    import torch


def _to_uint8(images: torch.Tensor):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded like saving a PNG would."""
    import torch

    x = images.detach().float().cpu().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(
    images: torch.Tensor,
    path: Path | str,
    rows: int = 10,
    cols: int = 8,
    *,
    labels: list[int] | None = None,
    pad: int = 2,
) -> Path:
    """PNG grid of `rows` x `cols` cells; with `labels`, row r shows the first images of class r.

    Without labels, images fill the grid row by row. Missing cells stay black; `pad` grey pixels
    separate cells. Size: (cols * W + (cols + 1) * pad, rows * H + (rows + 1) * pad).
    """
    from PIL import Image

    pixels = _to_uint8(images).numpy()
    h, w = pixels.shape[1:3]
    if labels is not None:
        by_row: list[list[int]] = [[] for _ in range(rows)]
        for i, label in enumerate(labels):
            if 0 <= int(label) < rows and len(by_row[int(label)]) < cols:
                by_row[int(label)].append(i)
        cells = [(r, c, i) for r, idx in enumerate(by_row) for c, i in enumerate(idx)]
    else:
        cells = [(i // cols, i % cols, i) for i in range(min(len(pixels), rows * cols))]
    canvas = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "gray")
    for r in range(rows):
        for c in range(cols):
            x, y = pad + c * (w + pad), pad + r * (h + pad)
            canvas.paste((0, 0, 0), (x, y, x + w, y + h))
    for r, c, i in cells:
        canvas.paste(Image.fromarray(pixels[i]), (pad + c * (w + pad), pad + r * (h + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
