"""WeightSpaceBatch: many networks of one architecture as batched, channelled tensors.

A batch holds, for every *processed* key of a :class:`~weightspace.PermutationSpec`, one tensor of
shape ``(B, *param_shape, C)`` (channels last: ``B`` networks, ``C`` feature channels per weight;
``C = 1`` for raw weights). Every other entry of the state dicts (BatchNorm running statistics and
counters by default, integer buffers, keys the caller excluded) is kept aside per network and given
back unchanged by :meth:`WeightSpaceBatch.to_state_dicts`, so ``from_state_dicts`` followed by
``to_state_dicts`` is an exact round trip (same keys, order, dtypes and values).

The permutation group of the spec acts on a batch through :meth:`WeightSpaceBatch.permute`, one
permutation per network if wanted; equivariant processors commute with it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from weightspace.results import WeightspaceError
from weightspace.symmetry import PermutationSpec, SpecError

log = logging.getLogger(__name__)

__all__ = ["WeightSpaceBatch", "BatchError", "default_keys", "BUFFER_SUFFIXES"]

#: Names of state-dict entries that are buffers, not weights; kept aside unless ``buffers=True``.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


class BatchError(WeightspaceError, ValueError):
    """Weights that do not fit a spec, mixed architectures in one dense batch, or an empty batch."""


def _is_buffer_name(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in BUFFER_SUFFIXES


def default_keys(spec: PermutationSpec, buffers: bool = False) -> Tuple[str, ...]:
    """The keys a processor reads by default: every key of ``spec`` except BatchNorm buffers
    (``running_mean``, ``running_var``, ``num_batches_tracked``; kept with ``buffers=True``, the
    integer counter never) and the spec's optional keys (non-persistent buffers, tied aliases)."""
    skip = spec.optional_keys()
    out = []
    for k in spec.axes:
        if k in skip or k.endswith("num_batches_tracked"):
            continue
        if not buffers and _is_buffer_name(k):
            continue
        out.append(k)
    return tuple(out)


Perms = Mapping[str, torch.Tensor]


class WeightSpaceBatch:
    """``B`` networks of one architecture, each weight tensor with ``C`` channels (channels last).

    Attributes
    ----------
    spec : the :class:`~weightspace.PermutationSpec` whose group acts on the batch.
    keys : the processed keys, in state-dict order.
    tensors : ``{key: tensor of shape (B, *spec.shapes[key], C)}``.
    aside : per network, the state-dict entries that are not processed (or ``None``).
    dtypes : ``{key: original dtype}``, restored by :meth:`to_state_dicts`.
    order : the original key order of the state dicts.

    Construct with :meth:`from_state_dicts` or :meth:`from_models`; processors return new batches
    with the same structure (``with_tensors``).
    """

    def __init__(
        self,
        spec: PermutationSpec,
        tensors: Mapping[str, torch.Tensor],
        *,
        aside: Optional[Sequence[Mapping[str, Any]]] = None,
        dtypes: Optional[Mapping[str, torch.dtype]] = None,
        order: Optional[Sequence[str]] = None,
    ) -> None:
        if not isinstance(spec, PermutationSpec):
            raise BatchError(f"spec must be a weightspace.PermutationSpec, not {type(spec).__name__}")
        if not tensors:
            raise BatchError("a WeightSpaceBatch needs at least one tensor")
        self.spec = spec
        self.tensors: Dict[str, torch.Tensor] = OrderedDict(tensors)
        self.keys: Tuple[str, ...] = tuple(self.tensors)
        first = next(iter(self.tensors.values()))
        B, C = first.shape[0], first.shape[-1]
        for k, t in self.tensors.items():
            if k not in spec.axes:
                raise BatchError(f"key {k!r} is not described by the spec; pass keys= to choose the processed keys")
            shape = spec.shapes.get(k, tuple(t.shape[1:-1]))
            if tuple(t.shape) != (B,) + tuple(shape) + (C,):
                raise BatchError(f"tensor {k!r} has shape {tuple(t.shape)}; expected (B={B}, *{tuple(shape)}, C={C})")
        self.aside = None if aside is None else tuple(dict(a) for a in aside)
        if self.aside is not None and len(self.aside) != B:
            raise BatchError(f"{len(self.aside)} aside dicts for a batch of {B} networks")
        self.dtypes = dict(dtypes or {k: t.dtype for k, t in self.tensors.items()})
        self.order = tuple(order) if order is not None else self.keys

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_state_dicts(
        cls,
        state_dicts: Sequence[Mapping[str, torch.Tensor]],
        spec: PermutationSpec,
        *,
        keys: Optional[Sequence[str]] = None,
        buffers: bool = False,
        dtype: Optional[torch.dtype] = None,
        device: Any = None,
    ) -> "WeightSpaceBatch":
        """Stack ``state_dicts`` (one architecture) into a batch with one channel.

        Parameters
        ----------
        state_dicts : sequence of ``{key: tensor}`` (e.g. ``model.state_dict()``), all of one architecture.
        spec : the permutation spec of that architecture (``ws.permutation_spec(model, x)``).
        keys : the keys to process (default :func:`default_keys`: all floating entries of the spec
            except BatchNorm buffers). Everything else is kept aside per network.
        buffers : also process floating BatchNorm running statistics (default ``False``).
        dtype : the dtype of the stacked tensors (default: the widest floating dtype present,
            at least float32, so the round trip is exact).
        device : where the stacked tensors live (default: where the first state dict's tensors are;
            ``"auto"``: CUDA when available).

        Raises :class:`BatchError` for an empty sequence, a key the spec does not describe, a
        tensor whose shape differs from the spec (naming the key and both shapes) and networks of
        different architectures (pointing to the graph processors, which take mixed batches).
        """
        if isinstance(state_dicts, Mapping):
            raise BatchError("from_state_dicts takes a sequence of state dicts; wrap a single one in a list")
        sds = list(state_dicts)
        if not sds:
            raise BatchError("empty batch: from_state_dicts needs at least one state dict")
        for i, sd in enumerate(sds):
            if not isinstance(sd, Mapping):
                raise BatchError(f"network {i} is a {type(sd).__name__}, not a state dict; use from_models for modules")
        ref = sds[0]
        ref_keys = list(ref)
        unknown = [k for k in ref_keys if k not in spec.axes and torch.is_tensor(ref[k])]
        if keys is None:
            wanted = [
                k for k in default_keys(spec, buffers) if k in ref or k not in spec.optional_keys()
            ]
            missing = [k for k in wanted if k not in ref]
            if missing:
                raise BatchError(
                    f"the state dicts lack keys the spec describes: {missing[:5]}; was the spec made for another architecture?"  # noqa: E501
                )
            keys = [k for k in ref_keys if k in set(wanted) and torch.is_tensor(ref[k]) and ref[k].is_floating_point()]
            if unknown:
                raise BatchError(
                    f"the spec does not describe the state-dict keys {unknown[:5]}; was it made for another architecture?"  # noqa: E501
                )
        else:
            keys = list(keys)
            bad = [k for k in keys if k not in spec.axes]
            if bad:
                raise BatchError(f"keys {bad[:5]} are not described by the spec")
            absent = [k for k in keys if k not in ref]
            if absent:
                raise BatchError(f"keys {absent[:5]} are not in the state dicts")
            nonfloat = [k for k in keys if not (torch.is_tensor(ref[k]) and ref[k].is_floating_point())]
            if nonfloat:
                raise BatchError(f"keys {nonfloat[:5]} are not floating-point tensors; only weights can be processed")
            keys = [k for k in ref_keys if k in set(keys)]
        if not keys:
            raise BatchError("no floating-point key of the state dicts is described by the spec; nothing to process")
        for k in keys:
            want = tuple(spec.shapes.get(k, ref[k].shape))
            if tuple(ref[k].shape) != want:
                raise BatchError(
                    f"weights do not match the spec: {k!r} has shape {tuple(ref[k].shape)} in network 0 "
                    f"but the spec says {want}"
                )
        mixed = (
            "mixed architectures in one dense batch; a WeightSpaceBatch holds one architecture. "
            "For networks of different architectures use the graph processors "
            "(ws.NeuralGraph.batch(graphs) with weightspace.nn.GraphProcessor)"
        )
        for i, sd in enumerate(sds[1:], 1):
            if list(sd) != ref_keys:
                diff = sorted(set(sd) ^ set(ref_keys))[:5]
                raise BatchError(
                    f"{mixed}: network {i} has different keys than network 0 (e.g. {diff or 'a different order'})"
                )
            for k in ref_keys:
                a, b = ref[k], sd[k]
                if torch.is_tensor(a) != torch.is_tensor(b) or (
                    torch.is_tensor(a) and (a.shape != b.shape or a.dtype != b.dtype)
                ):
                    sa = (tuple(a.shape), a.dtype) if torch.is_tensor(a) else type(a).__name__
                    sb = (tuple(b.shape), b.dtype) if torch.is_tensor(b) else type(b).__name__
                    raise BatchError(f"{mixed}: {k!r} is {sb} in network {i} but {sa} in network 0")
        dtypes = {k: ref[k].dtype for k in keys}
        if dtype is None:
            dtype = torch.float32
            for d in dtypes.values():
                if torch.finfo(d).bits > torch.finfo(dtype).bits:
                    dtype = d
        if device is None:
            device = ref[keys[0]].device
        elif isinstance(device, str) and device == "auto":
            from weightspace.utils import resolve_device

            device = resolve_device("auto")
        tensors = OrderedDict(
            (k, torch.stack([sd[k].detach().to(device=device, dtype=dtype) for sd in sds]).unsqueeze(-1)) for k in keys
        )
        kset = set(keys)
        aside = [OrderedDict((k, v) for k, v in sd.items() if k not in kset) for sd in sds]
        return cls(spec, tensors, aside=aside, dtypes=dtypes, order=ref_keys)

    @classmethod
    def from_models(cls, models: Sequence[torch.nn.Module], spec: PermutationSpec, **kwargs) -> "WeightSpaceBatch":
        """Like :meth:`from_state_dicts` on ``[m.state_dict() for m in models]`` (models are not modified)."""
        models = list(models)
        if not models:
            raise BatchError("empty batch: from_models needs at least one model")
        return cls.from_state_dicts(
            [{k: v.detach() for k, v in m.state_dict().items()} for m in models], spec, **kwargs
        )

    # -- back to state dicts ------------------------------------------------------------------------
    def to_state_dicts(self, channel: Optional[int] = None) -> List[Dict[str, Any]]:
        """One state dict per network: processed keys in their original dtypes, aside entries as given.

        A batch with several channels needs ``channel=`` to say which channel holds the weights.
        """
        C = self.num_channels
        if channel is None:
            if C != 1:
                raise BatchError(
                    f"this batch has {C} channels; pass channel= (0..{C - 1}) to choose the one that holds the weights"
                )
            channel = 0
        if not -C <= channel < C:
            raise BatchError(f"channel {channel} out of range for a batch with {C} channels")
        out = []
        for i in range(self.batch_size):
            sd: Dict[str, Any] = OrderedDict()
            for k in self.order:
                if k in self.tensors:
                    sd[k] = (
                        self.tensors[k][i, ..., channel].detach().to(self.dtypes.get(k, self.tensors[k].dtype)).clone()
                    )
                elif self.aside is not None and k in self.aside[i]:
                    v = self.aside[i][k]
                    sd[k] = v.clone() if torch.is_tensor(v) else v
            out.append(sd)
        return out

    # -- properties ---------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def num_channels(self) -> int:
        return next(iter(self.tensors.values())).shape[-1]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __repr__(self) -> str:
        n = sum(t[0, ..., 0].numel() for t in self.tensors.values())
        return (
            f"WeightSpaceBatch({self.batch_size} networks x {n} weights x {self.num_channels} channels, "
            f"{len(self.keys)} tensors, {self.dtype}, {self.device})"
        )

    # -- functional helpers --------------------------------------------------------------------------
    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> "WeightSpaceBatch":
        """A batch of the same structure (spec, aside entries, dtypes, order) holding ``tensors``."""
        if set(tensors) != set(self.keys):
            raise BatchError(
                f"with_tensors needs exactly the keys of this batch; differing: {sorted(set(tensors) ^ set(self.keys))[:5]}"  # noqa: E501
            )
        return WeightSpaceBatch(
            self.spec,
            OrderedDict((k, tensors[k]) for k in self.keys),
            aside=self.aside,
            dtypes=self.dtypes,
            order=self.order,
        )

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "WeightSpaceBatch":
        """Apply ``fn`` to every tensor (it must keep the (B, *shape, .) layout; channels may change)."""
        return self.with_tensors({k: fn(t) for k, t in self.tensors.items()})

    def to(self, *args, **kwargs) -> "WeightSpaceBatch":
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "WeightSpaceBatch":
        return self.map(torch.Tensor.detach)

    def __add__(self, other: "WeightSpaceBatch") -> "WeightSpaceBatch":
        if not isinstance(other, WeightSpaceBatch):
            return NotImplemented
        if other.keys != self.keys:
            raise BatchError("cannot add batches with different keys")
        return self.with_tensors({k: self.tensors[k] + other.tensors[k] for k in self.keys})

    def __mul__(self, scalar: float) -> "WeightSpaceBatch":
        return self.map(lambda t: t * scalar)

    __rmul__ = __mul__

    def select(self, index: Union[int, slice, Sequence[int], torch.Tensor]) -> "WeightSpaceBatch":
        """The networks at ``index`` (an int, slice, list or LongTensor) as a new batch."""
        if isinstance(index, int):
            index = [index]
        idx = (
            torch.arange(self.batch_size)[index]
            if isinstance(index, slice)
            else torch.as_tensor(index, dtype=torch.long)
        )
        aside = None if self.aside is None else [self.aside[int(i)] for i in idx]
        tensors = {k: t.index_select(0, idx.to(t.device)) for k, t in self.tensors.items()}
        return WeightSpaceBatch(self.spec, tensors, aside=aside, dtypes=self.dtypes, order=self.order)

    @staticmethod
    def cat(batches: Sequence["WeightSpaceBatch"]) -> "WeightSpaceBatch":
        """Concatenate batches of one structure along the network axis (a DataLoader ``collate_fn``)."""
        batches = list(batches)
        if not batches:
            raise BatchError("empty batch: cat needs at least one WeightSpaceBatch")
        first = batches[0]
        for i, b in enumerate(batches[1:], 1):
            if b.keys != first.keys or any(b.tensors[k].shape[1:] != first.tensors[k].shape[1:] for k in first.keys):
                raise BatchError(
                    f"batch {i} has a different structure (keys, shapes or channels) than batch 0; "
                    "for mixed architectures use the graph processors"
                )
        aside = None if any(b.aside is None for b in batches) else [a for b in batches for a in b.aside]
        tensors = {k: torch.cat([b.tensors[k] for b in batches]) for k in first.keys}
        return WeightSpaceBatch(first.spec, tensors, aside=aside, dtypes=first.dtypes, order=first.order)

    def flatten(self) -> torch.Tensor:
        """All weights of each network in one row: ``(B, D * C)`` (keys in order, row-major)."""
        B = self.batch_size
        return torch.cat([t.reshape(B, -1) for t in self.tensors.values()], dim=1)

    # -- the group action ------------------------------------------------------------------------------
    def permute(self, perms: Union[Perms, Sequence[Perms]]) -> "WeightSpaceBatch":
        """Apply permutations of the spec's groups: one ``{group: LongTensor}`` for every network, or a
        list with one per network. Same convention as :func:`weightspace.permute`
        (``B'[i] = B[perm[i]]``), so for ``C = 1`` this equals permuting each state dict."""
        B = self.batch_size
        per_net = not isinstance(perms, Mapping)
        plist = list(perms) if per_net else [perms]
        if per_net and len(plist) != B:
            raise BatchError(
                f"{len(plist)} permutations for a batch of {B} networks; give one per network or one dict for all"
            )
        for p in plist:
            missing = [g for g in self.spec.groups if g not in p]
            if missing:
                raise SpecError(f"no permutation given for groups {missing[:5]}; pass one for every group of the spec")
        dev = self.device
        out = {}
        for k, t in self.tensors.items():
            for ax, lay in enumerate(self.spec.axes[k]):
                if lay is None or not any(True for _ in lay.groups()):
                    continue
                if per_net:
                    idx = torch.stack([lay.index(p, device=dev) for p in plist])  # (B, n)
                    shape = [B] + [1] * (t.dim() - 1)
                    shape[ax + 1] = idx.shape[1]
                    idx = idx.reshape(shape).expand(*t.shape[: ax + 1], idx.shape[1], *t.shape[ax + 2 :])
                    t = torch.gather(t, ax + 1, idx)
                else:
                    t = t.index_select(ax + 1, lay.index(plist[0], device=dev))
            out[k] = t
        aside = self.aside
        if aside is not None:  # running statistics and other kept-aside entries move with their units
            aside = [
                OrderedDict(
                    (k, _permute_entry(v, self.spec.axes.get(k), plist[i if per_net else 0])) for k, v in a.items()
                )
                for i, a in enumerate(aside)
            ]
        return WeightSpaceBatch(self.spec, out, aside=aside, dtypes=self.dtypes, order=self.order)


def _permute_entry(v: Any, layouts: Optional[tuple], perms: Perms) -> Any:
    if layouts is None or not torch.is_tensor(v) or v.dim() != len(layouts):
        return v
    for ax, lay in enumerate(layouts):
        if lay is not None and any(True for _ in lay.groups()):
            v = v.index_select(ax, lay.index(perms, device=v.device))
    return v
