"""Baselines for learning on weights: an MLP on the flat weights and StatNN on per-tensor statistics.

* :class:`FlatMLP` -- all weights concatenated into one vector, then an MLP (the "MLP" rows of
  Navon et al. 2023, arXiv:2301.12780, and Zhou et al. 2023, arXiv:2302.14040). Not invariant: train
  it with random permutations (``batch.permute(...)``) as augmentation to give it a chance.
* :class:`StatNN` -- Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights",
  arXiv:2002.11448: for every tensor (and channel) the mean, variance and the 0, 25, 50, 75, 100 %
  quantiles, then an MLP. Invariant to every permutation *within* a tensor (a much larger group than
  the spec's), so it cannot see how tensors are wired together.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from weightspace.nn._batch import WeightSpaceBatch
from weightspace.nn._unf import SpecLike, check_batch, check_dtype, make_activation, resolve_space

__all__ = ["FlatMLP", "StatNN", "StatFeatures"]


def _mlp(sizes: Sequence[int], activation) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(make_activation(activation))
    return nn.Sequential(*layers)


class FlatMLP(nn.Module):
    """An MLP on the flattened weights (a non-invariant baseline).

    ``out_features=k`` gives ``(B, k)``; ``out_features=None`` gives a :class:`WeightSpaceBatch` with
    ``out_channels`` channels (the MLP predicts every weight). The hidden width is ``hidden_features``
    (default ``16 * hidden_channels``, a budget comparable to the equivariant processors), with
    ``num_layers`` hidden layers.
    """

    family = "FlatMLP"

    def __init__(
        self,
        spec: SpecLike,
        hidden_channels: int = 16,
        num_layers: int = 3,
        out_features: Optional[int] = 1,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        keys: Optional[Sequence[str]] = None,
        hidden_features: Optional[int] = None,
        activation: Union[str, nn.Module] = "relu",
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        spec, keys = resolve_space(spec, keys)
        self.keys, self.out_features, self.in_channels, self.out_channels = (
            tuple(keys),
            out_features,
            in_channels,
            out_channels,
        )
        self.shapes = [tuple(spec.shapes[k]) for k in keys]
        self.numel = sum(int(torch.Size(s).numel()) for s in self.shapes)
        width = hidden_features or 16 * hidden_channels
        out = out_features if out_features is not None else self.numel * out_channels
        self.mlp = _mlp([self.numel * in_channels] + [width] * num_layers + [out], activation)
        self.input_scale = float(input_scale)

    def forward(self, batch: WeightSpaceBatch) -> Union[torch.Tensor, WeightSpaceBatch]:
        check_batch(batch, self.keys, self.in_channels, "FlatMLP")
        check_dtype(self, batch, "FlatMLP")
        y = self.mlp(batch.flatten() * self.input_scale)
        if self.out_features is not None:
            return y
        B, out, off = y.shape[0], {}, 0
        for k, s in zip(self.keys, self.shapes):
            n = int(torch.Size(s).numel()) * self.out_channels
            out[k] = y[:, off : off + n].reshape(B, *s, self.out_channels)
            off += n
        return batch.with_tensors(out)


class StatFeatures(nn.Module):
    """Per tensor and channel: mean, variance and the 0/25/50/75/100 % quantiles -> ``(B, 7 * K * C)``."""

    QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__()
        self.keys = tuple(keys)

    def forward(self, batch: WeightSpaceBatch) -> torch.Tensor:
        feats = []
        for k in self.keys:
            t = batch.tensors[k]
            x = t.reshape(t.shape[0], -1, t.shape[-1])  # (B, n, C)
            q = torch.quantile(x, torch.tensor(self.QUANTILES, dtype=x.dtype, device=x.device), dim=1)  # (5, B, C)
            var = x.var(dim=1, unbiased=False) if x.shape[1] > 1 else torch.zeros_like(x[:, 0])
            feats += [x.mean(dim=1), var] + list(q.unbind(0))
        return torch.cat(feats, dim=-1)


class StatNN(nn.Module):
    """StatNN (Unterthiner et al. 2020): per-tensor statistics, a BatchNorm over the features, an MLP.

    ``out_features`` must be an int (StatNN has no equivariant output). ``hidden_features`` defaults
    to ``16 * hidden_channels``.
    """

    family = "StatNN"

    def __init__(
        self,
        spec: SpecLike,
        hidden_channels: int = 16,
        num_layers: int = 3,
        out_features: int = 1,
        *,
        in_channels: int = 1,
        keys: Optional[Sequence[str]] = None,
        hidden_features: Optional[int] = None,
        activation: Union[str, nn.Module] = "relu",
        feature_norm: bool = True,
    ) -> None:
        super().__init__()
        if out_features is None:
            raise ValueError(
                "StatNN is an invariant model; it needs an integer out_features (use UNF/NFN for equivariant outputs)"
            )
        spec, keys = resolve_space(spec, keys)
        self.keys, self.in_channels = tuple(keys), in_channels
        self.features = StatFeatures(keys)
        n = 7 * len(keys) * in_channels
        self.norm = nn.BatchNorm1d(n, affine=False) if feature_norm else nn.Identity()
        self.mlp = _mlp([n] + [hidden_features or 16 * hidden_channels] * num_layers + [int(out_features)], activation)

    def forward(self, batch: WeightSpaceBatch) -> torch.Tensor:
        check_batch(batch, self.keys, self.in_channels, "StatNN")
        check_dtype(self, batch, "StatNN")
        return self.mlp(self.norm(self.features(batch)))
