"""The permutation specification: which axes of which tensors each permutation group acts on.

A :class:`PermutationSpec` maps every parameter/buffer key to one *layout* per tensor axis:

* ``None`` -- the axis never moves (inputs, outputs, kernel positions, classes, ...);
* ``Axis.group(name, n)`` -- the axis is permuted by group ``name`` (size ``n``);
* ``Axis.product(a, b, ...)`` -- the axis is a row-major flattening of sub-axes ``a x b x ...``
  (a conv feature map flattened into a Linear: ``product(channels, fixed(H*W))``; attention heads:
  ``product(heads, head_dim)``); index ``(i_a, i_b)`` moves to ``(p_a[i_a], p_b[i_b])``;
* ``Axis.concat(a, b, ...)`` -- the axis is a concatenation of sub-axes (packed ``in_proj`` of
  ``nn.MultiheadAttention``: ``concat(q, k, v)``); each block is permuted by its own layout.

The groups are the single source of truth for sizes; ``perm_to_axes`` is derived. This generalises
the ``axes_to_perm`` format of Git Re-Basin (Ainsworth, Hayase & Srinivasa 2023, arXiv:2209.04836),
to which :meth:`PermutationSpec.to_rebasin` exports whenever every axis is simple.

Permutation convention (Git Re-Basin): applying ``perm`` to an axis gives ``B'[i] = B[perm[i]]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from weightspace.results import WeightspaceError

__all__ = ["Axis", "PermutationSpec", "SpecError", "Layout"]


class SpecError(WeightspaceError, ValueError):
    """A permutation spec is inconsistent with itself, with a model, or with the permutations given."""


@dataclass(frozen=True)
class Axis:
    """Layout of one tensor axis (or of one block of a structured axis).

    ``kind`` is ``"group"`` (permuted by ``name``), ``"fixed"`` (never moves), ``"product"``
    (row-major flattening of ``parts``) or ``"concat"`` (concatenation of ``parts``).
    """

    kind: str
    size: int
    name: Optional[str] = None
    parts: Tuple["Axis", ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("group", "fixed", "product", "concat"):
            raise SpecError(f"unknown axis kind {self.kind!r}")
        if self.kind == "product":
            n = 1
            for p in self.parts:
                n *= p.size
            if n != self.size:
                raise SpecError(f"product axis of size {self.size} has parts of sizes {[p.size for p in self.parts]}")
        if self.kind == "concat" and sum(p.size for p in self.parts) != self.size:
            raise SpecError(f"concat axis of size {self.size} has parts of sizes {[p.size for p in self.parts]}")

    # -- constructors -------------------------------------------------------------------------
    @staticmethod
    def group(name: str, size: int) -> "Axis":
        return Axis("group", int(size), name=name)

    @staticmethod
    def fixed(size: int) -> "Axis":
        return Axis("fixed", int(size))

    @staticmethod
    def product(*parts: "Axis") -> "Axis":
        n = 1
        for p in parts:
            n *= p.size
        return Axis("product", n, parts=tuple(parts))

    @staticmethod
    def concat(*parts: "Axis") -> "Axis":
        return Axis("concat", sum(p.size for p in parts), parts=tuple(parts))

    # -- queries ------------------------------------------------------------------------------
    def groups(self) -> Iterator[Tuple[str, Tuple[int, ...]]]:
        """Yield ``(group name, path)`` for every group leaf, ``path`` indexing into ``parts``."""
        if self.kind == "group":
            yield self.name, ()
        for i, p in enumerate(self.parts):
            for name, path in p.groups():
                yield name, (i,) + path

    @property
    def is_simple(self) -> bool:
        return self.kind in ("group", "fixed")

    def index(self, perms: Mapping[str, torch.Tensor], device: Optional[torch.device] = None) -> torch.Tensor:
        """The gather index of length ``size`` that this layout's permutation applies to the axis."""
        if self.kind == "fixed":
            return torch.arange(self.size, device=device)
        if self.kind == "group":
            return perms[self.name].to(device)
        subs = [p.index(perms, device) for p in self.parts]
        if self.kind == "concat":
            out, off = [], 0
            for p, s in zip(self.parts, subs):
                out.append(s + off)
                off += p.size
            return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=device)
        # product: row-major ravel of (s_1[i_1], ..., s_k[i_k])
        idx = torch.zeros((), dtype=torch.long, device=device)
        for p, s in zip(self.parts, subs):
            idx = (idx.unsqueeze(-1) * p.size + s).reshape(-1)
        return idx.reshape(-1)

    def __str__(self) -> str:
        if self.kind == "group":
            return self.name
        if self.kind == "fixed":
            return f"~{self.size}"
        sep = " x " if self.kind == "product" else " | "
        return "(" + sep.join(str(p) for p in self.parts) + ")"


Layout = Optional[Axis]


def _as_layout(x: Union[None, str, Axis], size: int, groups: Dict[str, int], where: str) -> Layout:
    if x is None:
        return None
    if isinstance(x, str):
        if x not in groups:
            groups[x] = size
        return Axis.group(x, groups[x])
    if isinstance(x, Axis):
        return x
    raise SpecError(f"{where}: a layout is None, a group name or an Axis, not {type(x).__name__}")


@dataclass(frozen=True)
class PermutationSpec:
    """Which (key, axis) every permutation group acts on.

    Attributes
    ----------
    groups : mapping group name -> size, in discovery order.
    axes : mapping key -> tuple of layouts, one per tensor axis (``None`` = not permuted).
    shapes : mapping key -> tensor shape, used to validate the spec against models and checkpoints.
    info : free-form provenance (how the spec was made, operations that blocked symmetries, ...).

    The spec is validated on construction: every layout's size must equal the tensor's size on that
    axis and every group's size must agree with every axis it acts on; an error names the group, the
    key, the axis and both sizes.
    """

    groups: Mapping[str, int]
    axes: Mapping[str, Tuple[Layout, ...]]
    shapes: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", MappingProxyType(dict(self.groups)))
        object.__setattr__(self, "axes", MappingProxyType({k: tuple(v) for k, v in self.axes.items()}))
        object.__setattr__(self, "shapes",
                           MappingProxyType({k: tuple(int(s) for s in v) for k, v in self.shapes.items()}))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))
        self._validate()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_axes_to_perm(
        cls,
        axes_to_perm: Mapping[str, Sequence[Union[None, str, Axis]]],
        shapes: Union[Mapping[str, Sequence[int]], Mapping[str, torch.Tensor], torch.nn.Module],
        info: Optional[Mapping[str, Any]] = None,
    ) -> "PermutationSpec":
        """Build a spec from a hand-written Git Re-Basin style ``axes_to_perm`` mapping.

        ``shapes`` is a state dict, a module, or a mapping key -> shape; group sizes are read from the
        first (key, axis) each group appears on and checked against all others.

        >>> spec = PermutationSpec.from_axes_to_perm(
        ...     {"0.weight": ("P0", None), "0.bias": ("P0",), "2.weight": (None, "P0"), "2.bias": (None,)},
        ...     {"0.weight": (4, 3), "0.bias": (4,), "2.weight": (2, 4), "2.bias": (2,)})
        >>> dict(spec.groups)
        {'P0': 4}
        """
        if isinstance(shapes, torch.nn.Module):
            shapes = shapes.state_dict()
        shp = {k: tuple(v.shape) if torch.is_tensor(v) else tuple(v) for k, v in shapes.items()}
        groups: Dict[str, int] = {}
        axes: Dict[str, Tuple[Layout, ...]] = {}
        for key, layouts in axes_to_perm.items():
            if key not in shp:
                raise SpecError(f"axes_to_perm names {key!r}, which has no shape; the known keys include "
                                f"{sorted(shp)[:8]}")
            if len(layouts) != len(shp[key]):
                raise SpecError(f"{key!r} has {len(shp[key])} axes (shape {shp[key]}) but {len(layouts)} layouts were "
                                "given")
            axes[key] = tuple(_as_layout(x, shp[key][i], groups, f"{key}[{i}]") for i, x in enumerate(layouts))
        for key, s in shp.items():
            axes.setdefault(key, (None,) * len(s))
        return cls(groups=groups, axes=axes, shapes=shp, info=dict(info or {}, source="hand-written"))

    def _validate(self) -> None:
        sizes: Dict[str, Tuple[int, str]] = {}
        for key, layouts in self.axes.items():
            shape = self.shapes.get(key)
            if shape is not None and len(shape) != len(layouts):
                raise SpecError(f"{key!r}: {len(layouts)} layouts for a tensor of shape {shape}")
            for ax, lay in enumerate(layouts):
                if lay is None:
                    continue
                if shape is not None and lay.size != shape[ax]:
                    raise SpecError(f"{key!r} axis {ax}: layout {lay} has size {lay.size} but the tensor has size "
                                    f"{shape[ax]}")
                self._check_sizes(lay, key, ax, sizes)
        for name, (n, where) in sizes.items():
            if name not in self.groups:
                raise SpecError(f"group {name!r} is used at {where} but not declared in groups")
            if self.groups[name] != n:
                raise SpecError(f"group {name!r} has size {self.groups[name]} but acts on {where} of size {n}")

    def _check_sizes(self, lay: Axis, key: str, ax: int, sizes: Dict[str, Tuple[int, str]]) -> None:
        if lay.kind == "group":
            where = f"{key!r} axis {ax}"
            if lay.name in sizes and sizes[lay.name][0] != lay.size:
                first_n, first_where = sizes[lay.name]
                raise SpecError(f"group {lay.name!r}: {first_where} has size {first_n} but {where} has size {lay.size}")
            sizes.setdefault(lay.name, (lay.size, where))
        for p in lay.parts:
            self._check_sizes(p, key, ax, sizes)

    # -- derived views ------------------------------------------------------------------------
    @property
    def perm_to_axes(self) -> Dict[str, List[Tuple[str, int, Tuple[int, ...]]]]:
        """group -> [(key, axis, path)], derived from ``axes`` (path = () for a simple axis)."""
        out: Dict[str, List[Tuple[str, int, Tuple[int, ...]]]] = {g: [] for g in self.groups}
        for key, layouts in self.axes.items():
            for ax, lay in enumerate(layouts):
                if lay is not None:
                    for name, path in lay.groups():
                        out[name].append((key, ax, path))
        return out

    def activation_points(self, group: Optional[str] = None) -> Any:
        """Module outputs on which a group acts, in execution order: ``{group: ((module, dim), ...)}``.

        For activation-based matching (Git Re-Basin AM, ZipIt!, REPAIR): the activation of module
        ``module`` has the group's units along axis ``dim``. Only traced specs know these points.
        """
        pts = self.info.get("points")
        if pts is None:
            raise SpecError("this spec has no activation points (it was not traced); pass module names to "
                            "weightspace.features directly")
        if group is None:
            return dict(pts)
        if group not in self.groups:
            raise SpecError(f"unknown group {group!r}; the spec has {list(self.groups)}")
        return tuple(pts.get(group, ()))

    def permuted_keys(self) -> List[str]:
        return [k for k, lay in self.axes.items() if any(l is not None and any(True for _ in l.groups()) for l in lay)]

    def optional_keys(self) -> set:
        """Keys a state dict may lack: non-persistent buffers (absent from ``state_dict()``) and tied
        aliases (``info["tied"]``: alias -> the name :func:`weightspace.state.state_of` keeps, e.g.
        ``lm_head.weight`` -> ``transformer.wte.weight``); a present alias is permuted like its tensor."""
        return set(self.info.get("non_persistent", ())) | set(self.info.get("tied", {}))

    def to_rebasin(self) -> Tuple[Dict[str, List[Tuple[str, int]]], Dict[str, Tuple[Optional[str], ...]]]:
        """Export ``(perm_to_axes, axes_to_perm)`` in the Git Re-Basin reference format.

        Only simple axes (one group or nothing) can be expressed there; a structured axis (a flatten,
        attention heads, a packed projection) raises naming the key, with the route to take instead.
        """
        axes_to_perm: Dict[str, Tuple[Optional[str], ...]] = {}
        for key, layouts in self.axes.items():
            row = []
            for ax, lay in enumerate(layouts):
                if lay is None or lay.kind == "fixed":
                    row.append(None)
                elif lay.kind == "group":
                    row.append(lay.name)
                else:
                    raise SpecError(
                        f"{key!r} axis {ax} has the structured layout {lay}, which the Git Re-Basin format "
                        "cannot express; use PermutationSpec.axes directly (weightspace.permute handles it)"
                    )
            axes_to_perm[key] = tuple(row)
        perm_to_axes: Dict[str, List[Tuple[str, int]]] = {g: [] for g in self.groups}
        for key, row in axes_to_perm.items():
            for ax, g in enumerate(row):
                if g is not None:
                    perm_to_axes[g].append((key, ax))
        return perm_to_axes, axes_to_perm

    # -- patching -----------------------------------------------------------------------------
    def with_axes(self, updates: Mapping[str, Sequence[Union[None, str, Axis]]]) -> "PermutationSpec":
        """A new spec with the layouts of some keys replaced (for hand-patching a traced spec).

        Group names given as strings must already exist or get their size from the tensor's shape.
        Groups that no longer act anywhere are dropped.
        """
        groups = dict(self.groups)
        axes = dict(self.axes)
        for key, layouts in updates.items():
            if key not in self.shapes:
                raise SpecError(f"with_axes: unknown key {key!r}")
            shape = self.shapes[key]
            if len(layouts) != len(shape):
                raise SpecError(f"with_axes: {key!r} has shape {shape} but {len(layouts)} layouts were given")
            axes[key] = tuple(_as_layout(x, shape[i], groups, f"{key}[{i}]") for i, x in enumerate(layouts))
        return self._rebuilt(groups, axes, "with_axes")

    def without(self, *group_names: str) -> "PermutationSpec":
        """A new spec in which the named groups are fixed (never permuted)."""
        missing = [g for g in group_names if g not in self.groups]
        if missing:
            raise SpecError(f"unknown groups {missing}; the spec has {list(self.groups)}")
        drop = set(group_names)

        def strip(lay: Layout) -> Layout:
            if lay is None:
                return None
            if lay.kind == "group":
                return Axis.fixed(lay.size) if lay.name in drop else lay
            if lay.kind == "fixed":
                return lay
            parts = tuple(strip(p) for p in lay.parts)
            if all(p.kind == "fixed" for p in parts):
                return None
            return Axis(lay.kind, lay.size, parts=parts)

        def top(lay: Layout) -> Layout:
            lay = strip(lay)
            return None if lay is not None and lay.kind == "fixed" else lay

        axes = {k: tuple(top(l) for l in v) for k, v in self.axes.items()}
        return self._rebuilt({g: n for g, n in self.groups.items() if g not in drop}, axes, "without")

    def rename(self, mapping: Mapping[str, str]) -> "PermutationSpec":
        """A new spec with groups renamed by ``mapping`` (old -> new)."""

        def ren(lay: Layout) -> Layout:
            if lay is None:
                return None
            if lay.kind == "group":
                return Axis.group(mapping.get(lay.name, lay.name), lay.size)
            return Axis(lay.kind, lay.size, parts=tuple(ren(p) for p in lay.parts))

        groups = {mapping.get(g, g): n for g, n in self.groups.items()}
        if len(groups) != len(self.groups):
            raise SpecError("rename would merge two groups into one name")
        return PermutationSpec(groups, {k: tuple(ren(l) for l in v) for k, v in self.axes.items()}, self.shapes,
                               self.info)

    def _rebuilt(self, groups: Dict[str, int], axes: Dict[str, Tuple[Layout, ...]], how: str) -> "PermutationSpec":
        used = set()
        for layouts in axes.values():
            for lay in layouts:
                if lay is not None:
                    used.update(name for name, _ in lay.groups())
        info = dict(self.info)
        info["patched"] = tuple(info.get("patched", ())) + (how,)
        return PermutationSpec({g: n for g, n in groups.items() if g in used}, axes, self.shapes, info)

    # -- display ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.groups)

    def __str__(self) -> str:
        p2a = self.perm_to_axes
        lines = [f"PermutationSpec: {len(self.groups)} groups over {len(self.permuted_keys())} of {len(self.axes)} "
                 "tensors"]
        width = max([len(g) for g in self.groups] + [5])
        for g, n in self.groups.items():
            where = []
            for key, ax, path in p2a[g]:
                where.append(f"{key}[{ax}]" + ("" if not path else "." + ".".join(map(str, path))))
            shown = ", ".join(where[:6]) + (f", ... ({len(where)} axes)" if len(where) > 6 else "")
            lines.append(f"  {g:<{width}}  size {n:>5}  {shown}")
        structured = [(k, ax, lay) for k, v in self.axes.items() for ax, lay in enumerate(v)
                      if lay is not None and not lay.is_simple]
        if structured:
            lines.append("  structured axes:")
            for k, ax, lay in structured[:12]:
                lines.append(f"    {k}[{ax}] = {lay}")
            if len(structured) > 12:
                lines.append(f"    ... ({len(structured)} in all)")
        blocked = self.info.get("blocked_ops")
        if blocked:
            lines.append("  operations without a symmetry rule (their axes were fixed): "
                         + ", ".join(f"{o} x{c}" for o, c in blocked))
        return "\n".join(lines)

    __repr__ = __str__
