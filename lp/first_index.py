"""Index of the first maximum / first True along a dim, spelled out so that ties always go to the lowest index.

Eager `argmax` returns the first of tied maxima, but compiled code need not (inductor's CUDA reductions may pick
another one), and both greedy's token and the candidate tree's merging depend on the first. These helpers use
only a max, a compare and a min, whose results no kernel can reorder."""
from __future__ import annotations

import torch


def first_true(mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The lowest index along `dim` where `mask` is True; the dim's size where it is True nowhere."""
    size = mask.shape[dim]
    shape = [1] * mask.dim()
    shape[dim] = size
    index = torch.arange(size, device=mask.device).view(shape)
    return torch.where(mask, index, size).amin(dim)


def first_max(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """argmax with ties to the lowest index (as eager argmax); a slice holding a NaN gives that NaN's index, as
    argmax does."""
    top = x.amax(dim, keepdim=True)
    hit = (x == top) | x.isnan()
    return first_true(hit, dim).clamp(max=x.shape[dim] - 1)
