"""Images as the command lines write them: EDM's uint8 quantisation, preview grids with gaps between cells, and the
names of the files sample.py writes beside its images. No Lightning import (`sample.py fid` uses it)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["to_uint8", "image_grid", "MANIFEST", "GRID_FILE", "GRID_SEEDS", "GRID_GAP_VALUE"]

MANIFEST = "manifest.json"
# A preview grid of the first GRID_SEEDS seeds of a command, next to the PNGs (8×8 PNGs are unviewable alone).
GRID_FILE = "grid.png"
GRID_SEEDS = 64
# Mid grey between the cells: neither the black background nor the white strokes of the digits merge with it.
GRID_GAP_VALUE = 0.5


def to_uint8(x: Tensor) -> Tensor:
    """EDM's generate.py quantisation, uint8(clip(x·127.5 + 128, 0, 255)) (truncation = round-half-up of 127.5(x+1))."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def image_grid(images: Tensor, columns: int = 8, min_cell: int = 64) -> Tensor:
    """(N, C, H, W) in [−1, 1] → one (C, rows·(H·f + g) − g, columns·(W·f + g) − g) image in [0, 1]: each image
    upscaled by the integer factor f (nearest neighbour) that makes it at least `min_cell` pixels tall (8×8 digits are
    unviewable at native size), cells `g` = max(2, H·f/16) grey pixels apart so that neighbours do not merge."""
    images = ((images.float() + 1) / 2).clamp(0, 1)
    factor = max(1, -(-min_cell // images.shape[-2]))
    images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    count, channels, height, width = images.shape
    gap = max(2, height // 16)
    columns = min(columns, count)
    rows = -(-count // columns)
    grid = images.new_full((channels, rows * (height + gap) - gap, columns * (width + gap) - gap), GRID_GAP_VALUE)
    for i, img in enumerate(images):
        top, left = (height + gap) * (i // columns), (width + gap) * (i % columns)
        grid[:, top : top + height, left : left + width] = img
    return grid
