"""Small test models shared by the test files (one definition each; import with ``from _models import mlp``).

Construction is seeded with ``torch.manual_seed`` right before the layers are built, so a test gets the
same weights it got from its former local factory.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn


def mlp(sizes: Sequence[int], seed: Optional[int] = 0, *, act=nn.ReLU, bn_after: Sequence[int] = (),
        dtype: Optional[torch.dtype] = None) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) [BatchNorm1d] act ... Linear(sizes[-2], sizes[-1])``.

    ``bn_after`` lists the hidden layers (0-based) followed by a BatchNorm1d; ``dtype`` casts the model.
    """
    if seed is not None:
        torch.manual_seed(seed)
    layers = []
    n = len(sizes) - 1
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < n - 1:
            if i in bn_after:
                layers.append(nn.BatchNorm1d(b))
            layers.append(act())
    model = nn.Sequential(*layers)
    return model.to(dtype) if dtype is not None else model
