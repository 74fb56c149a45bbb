"""Pooling kernels of the path-norm recipe (Gonon et al. 2024, ICLR, arXiv:2310.01225): max-pools
become sum-pools over the same windows, average pools are corrected by ``(1/k)^q`` per edge, and adaptive
pools get their per-window sizes. Used by :mod:`analysis._pathnorm_recipe`.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F



# ----------------------------------------------------------------------------------------------
# pooling as linear neurons
# ----------------------------------------------------------------------------------------------
def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _stride(kernel, stride):
    return kernel if stride is None or stride == [] or stride == () else stride


def _sum_pool(t: torch.Tensor, kernel, stride, padding, ceil_mode: bool, dims: int) -> torch.Tensor:
    """Sum over each pooling window (zeros in the padding), same geometry as the pooling layer."""
    stride = _stride(kernel, stride)
    if dims == 1:
        k, s, p = _tuple(kernel, 1)[0], _tuple(stride, 1)[0], _tuple(padding, 1)[0]
        return F.avg_pool2d(t.unsqueeze(-2), (1, k), (1, s), (0, p), ceil_mode, True, 1).squeeze(-2)
    return F.avg_pool2d(t, kernel, stride, padding, ceil_mode, True, 1)


def _max_pool(x: torch.Tensor, kernel, stride, padding, dilation, ceil_mode, dims, tr) -> torch.Tensor:
    """Max-pool -> sum-pool with the same geometry (padding and dilation included)."""
    dil = _tuple(dilation, dims)
    if any(d != 1 for d in dil):
        if ceil_mode:
            raise tr.unsupported("max-pool with dilation > 1 and ceil_mode=True")
        c = x.shape[1]
        k = _tuple(kernel, dims)
        w = torch.ones((c, 1) + k, dtype=x.dtype, device=x.device)
        conv = F.conv1d if dims == 1 else F.conv2d
        return conv(x, w, None, _tuple(_stride(kernel, stride), dims), _tuple(padding, dims), dil, c)
    return _sum_pool(x, kernel, stride, padding, ceil_mode, dims)


def _avg_pool(x: torch.Tensor, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, dims,
              q) -> torch.Tensor:
    """Average pool as a linear neuron per window: ``sum_window(x) * (1/divisor)^q``.

    The divisor of each window is read from the pooling op itself (pooling ones and dividing by the
    window's count), so ``count_include_pad=False`` borders and ``divisor_override`` are exact.
    """
    ones = torch.ones_like(x[:1])
    summed = _sum_pool(x, kernel, stride, padding, ceil_mode, dims)
    count = _sum_pool(ones, kernel, stride, padding, ceil_mode, dims)
    stride = _stride(kernel, stride)
    if dims == 1:
        avg1 = F.avg_pool2d(ones.unsqueeze(-2), (1, _tuple(kernel, 1)[0]), (1, _tuple(stride, 1)[0]),
                            (0, _tuple(padding, 1)[0]), ceil_mode, count_include_pad).squeeze(-2)
    else:
        avg1 = F.avg_pool2d(ones, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    # edge weight of window j is 1/divisor_j = avg(ones)_j / count_j
    w = torch.where(count > 0, avg1 / count.clamp_min(1e-300), torch.zeros_like(count))
    return summed * w.pow(q)


def _adaptive_sizes(in_shape, out_size, device) -> torch.Tensor:
    """Number of inputs of each adaptive-pool window (product over the pooled dims)."""
    dims = len(out_size)
    total = None
    for d in range(dims):
        L, o = in_shape[-dims + d], out_size[d]
        o = L if o is None else o
        sizes = torch.tensor([math.ceil((i + 1) * L / o) - (i * L) // o for i in range(o)],
                             dtype=torch.float64, device=device)
        shape = [1] * dims
        shape[d] = o
        sizes = sizes.reshape(shape)
        total = sizes if total is None else total * sizes
    return total


def _adaptive(x: torch.Tensor, out_size, dims, kind, q) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adaptive pools (windows of uneven sizes ``n_j``): max -> window sum; avg -> sum * (1/n_j)^q."""
    out_size = _tuple(out_size, dims)
    pool = F.adaptive_avg_pool1d if dims == 1 else F.adaptive_avg_pool2d
    avg = pool(x, out_size)
    n = _adaptive_sizes(x.shape, out_size, x.device)
    if kind == "max":
        return avg * n, n
    return avg * n.pow(1.0 - q), n
