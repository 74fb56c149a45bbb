"""Data structures of the neural-graph construction: layers of nodes, where a tensor's units live,
edge blocks and node features (each recording where its parameter entries come from)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

from weightspace.results import WeightspaceError


class GraphError(WeightspaceError, RuntimeError):
    """The model uses an operation on its features that the neural graph cannot represent."""


_ACTIVATIONS = set("relu relu6 gelu tanh sigmoid silu mish sin cos leaky_relu elu selu celu softplus softsign hardtanh "
                   "hardsigmoid hardswish logsigmoid".split())


@dataclass
class Layer:
    """A set of nodes: the units of one feature axis at one point of the forward pass."""

    size: int
    # input | linear | conv | embedding | norm | sum | product | concat | split | query | key | value | attention
    kind: str
    name: str
    anchor: Optional[Tuple[str, int]] = None  # (param key, axis) whose spec layout permutes these nodes
    follows: Optional[int] = None  # layer id whose permutation these nodes share
    activation: str = ""
    offset: int = 0  # first global node id


@dataclass
class Feat:
    """Where a tensor's units live: ``layer`` indexed row-major by tensor ``dims``, each unit owning
    ``inner`` consecutive entries of the last of those dims (a flattened feature map)."""

    layer: int
    dims: Tuple[int, ...]
    inner: int = 1


@dataclass
class EdgeBlock:
    """Edges from ``src_layer`` to ``dst_layer``. ``src``/``dst`` index units within the layers; a
    complete bipartite block (``dense = (n_out, n_in, groups)``) leaves them implicit: edge
    ``o * n_in + i`` joins input ``i`` (offset by its group) to output ``o``."""

    src_layer: int
    dst_layer: int
    kind: str
    src: Optional[torch.Tensor]  # (E,) node index within the source layer
    dst: Optional[torch.Tensor]  # (E,) node index within the destination layer
    values: Optional[torch.Tensor] = None  # (E, k) or None for value-1 structural edges
    key: Optional[str] = None
    entries: Any = None  # values.reshape(-1)[t] == param.reshape(-1)[entries[t]] (a LongTensor or a slice)
    dense: Optional[Tuple[int, int, int]] = None

    @property
    def num(self) -> int:
        return self.dense[0] * self.dense[1] if self.dense else int(self.src.numel())

    def fill_index(self, out_src: torch.Tensor, out_dst: torch.Tensor, src_off: int, dst_off: int) -> None:
        """Write global source/target node ids into the (E,) views ``out_src``/``out_dst``."""
        if self.dense is None:
            out_src.copy_(self.src + src_off)
            out_dst.copy_(self.dst + dst_off)
            return
        n_out, n_in, groups = self.dense
        o = torch.arange(n_out).unsqueeze(1)
        src = torch.arange(n_in).unsqueeze(0) + src_off
        if groups > 1:  # grouped conv: input unit = group * (C_in / g) + i
            src = src + (o // (n_out // groups)) * n_in
        out_src.view(n_out, n_in).copy_(src.expand(n_out, n_in))
        out_dst.view(n_out, n_in).copy_((o + dst_off).expand(n_out, n_in))

    def endpoints(self) -> Tuple[torch.Tensor, torch.Tensor]:
        s, d = torch.empty(self.num, dtype=torch.long), torch.empty(self.num, dtype=torch.long)
        self.fill_index(s, d, 0, 0)
        return s, d


@dataclass
class NodeFeature:
    layer: int
    name: str
    values: torch.Tensor  # (layer size, k)
    key: Optional[str] = None
    entries: Optional[torch.Tensor] = None  # values.reshape(-1)[t] == param.reshape(-1)[entries[t]]
