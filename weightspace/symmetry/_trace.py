"""Discover a model's permutation symmetries by following tensor *dimensions* through one forward run.

The model runs once on ``example_inputs`` under a :class:`torch.overrides.TorchFunctionMode`. Every
dimension of every tensor is a node in a union-find; each operation adds the constraints that make it
permutation-equivariant:

* ``linear(x, W, b)``: ``x[-1] ~ W[1]``, output ``[-1] = W[0] ~ b[0]``;
* elementwise ops (with broadcasting): corresponding non-broadcast dims are one node, so a residual
  addition joins the groups on both sides;
* ``matmul``/``einsum``/attention: contracted dims are joined, batch dims joined;
* ``reshape``/``view``/``flatten``: a merged dim gets the layout ``product(parts)``, a split dim is
  factorised (``(H*D) -> (H, D)`` gives heads and within-head dims);
* ``cat``/``split``/``chunk``: the layout ``concat(parts)``;
* normalisations, pooling, softmax, reductions: their own rules (see ``_RULES``).

Dimensions of the model's inputs and outputs, positional dimensions (conv spatial outputs, sliced or
indexed dims, ``arange``) and every dimension touched by an operation without a rule are *fixed*.
A class of joined dimensions that holds a parameter axis, has size > 1 and is not fixed is a
permutation group. Because unknown operations fix everything they touch, the discovered symmetries
are sound *for the operations the run executed*; what an unknown operation costs is reported in
``spec.info["blocked_ops"]``.

What one run cannot see: a forward whose control flow or shapes depend on tensor *values*
(``if h.sum() > 0``, ``range(int(n))``, ``.item()``, ``.tolist()``, ``.numpy()`` feeding later code)
may take other operations on other inputs. Every such value leaving torch is recorded with the
lineage of the tensor it came from (the dimensions of every tensor it was computed from); an event
whose tensor depends on a dimension that ends up in a permutation group is listed in
``spec.info["data_dependent"]`` (op, module, count). Events on tensors that depend only on fixed
dimensions (the inputs themselves, shapes, fixed-size scalars of the inputs) are counted in
``spec.info["data_dependent_unflagged"]`` but not flagged: whatever path they choose, the permuted
dimensions they would have to reach are not involved.

The idea of deriving a spec from the model instead of writing it by hand answers the complaints
about hand-written specs of Git Re-Basin (Ainsworth et al. 2023) and ZipIt! (Stoica et al. 2024).
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import torch

from weightspace.results import WeightspaceError
from weightspace.symmetry._dims import _UF
from weightspace.tracing import TracingMode, Unsupported, flatten_tensors, op_name, tensor_keys, traced_run
from weightspace.symmetry._rules import (
    _argreduce,
    _cat,
    _elementwise,
    _expand,
    _getitem,
    _identity_like,
    _maxmin,
    _neutral,
    _permute,
    _positional,
    _reduce,
    _repeat,
    _repeat_interleave,
    _reshape,
    _softmax,
    _split,
    _stack,
    _unary,
)
from weightspace.symmetry._rules_layers import (
    _addmm,
    _batch_norm,
    _conv,
    _einsum,
    _embedding,
    _group_norm,
    _interpolate,
    _layer_norm,
    _linear,
    _matmul,
    _mha,
    _normalize,
    _pad,
    _pool,
    _rnn,
    _sdpa,
)
from weightspace.symmetry._spec import Axis, PermutationSpec

log = logging.getLogger(__name__)

__all__ = ["trace_dims", "TraceError", "DimTrace"]


_RULES = {
    "linear": _linear,
    "matmul": _matmul,
    "rmatmul": _matmul,
    "mm": _matmul,
    "bmm": _matmul,
    "mv": _matmul,
    "dot": _matmul,
    "addmm": _addmm,
    "baddbmm": _addmm,
    "addbmm": _addmm,
    "addmv": _addmm,
    "einsum": _einsum,
    "conv1d": _conv,
    "conv2d": _conv,
    "conv3d": _conv,
    "conv_transpose1d": _conv,
    "conv_transpose2d": _conv,
    "conv_transpose3d": _conv,
    "softmax": _softmax,
    "log_softmax": _softmax,
    "layer_norm": _layer_norm,
    "rms_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "instance_norm": _batch_norm,
    "group_norm": _group_norm,
    "normalize": _normalize,
    "embedding": _embedding,
    "permute": _permute,
    "transpose": _permute,
    "swapaxes": _permute,
    "swapdims": _permute,
    "t": _permute,
    "prop:T": _permute,
    "prop:mT": _permute,
    "movedim": _permute,
    "moveaxis": _permute,
    "expand": _expand,
    "expand_as": _expand,
    "broadcast_to": _expand,
    "repeat": _repeat,
    "tile": _repeat,
    "repeat_interleave": _repeat_interleave,
    "cat": _cat,
    "concat": _cat,
    "concatenate": _cat,
    "stack": _stack,
    "split": _split,
    "chunk": _split,
    "tensor_split": _split,
    "split_with_sizes": _split,
    "unbind": _split,
    "getitem": _getitem,
    "narrow": _positional,
    "select": _positional,
    "max": _maxmin,
    "min": _maxmin,
    "argmax": _argreduce,
    "argmin": _argreduce,
    "scaled_dot_product_attention": _sdpa,
    "multi_head_attention_forward": _mha,
    "interpolate": _interpolate,
    "upsample": _interpolate,
    "pad": _pad,
    "prop:data": _identity_like,
    "lstm": _rnn,
    "gru": _rnn,
    "rnn_tanh": _rnn,
    "rnn_relu": _rnn,
}


class TraceError(WeightspaceError, RuntimeError):
    """The model could not be run or followed on the example inputs (or, with ``strict=True``, the
    trace could not be followed soundly)."""


# Calls that turn tensor values into Python values (control flow, loop counts, indices, NumPy):
# the forward may branch on them, so one run may not show every operation of the model.
VALUE_EVENTS = frozenset(
    "bool int float index complex item tolist numpy array equal allclose is_nonzero".split()
)


class DimTrace(TracingMode):
    """Follows dimensions through a forward run (see the module docstring)."""

    rules = _RULES
    category_rules = {"unary": _unary, "binary": _elementwise, "reduce": _reduce, "pool": _pool,
                      "reshape": _reshape, "neutral": _neutral}

    def __init__(self) -> None:
        super().__init__()
        self.uf = _UF()
        self.nodes: Dict[int, List[int]] = {}
        self._keep: List[Any] = []  # keeps traced tensors alive so that their ids stay unique
        self.blocked: Counter = Counter()
        self.blocked_where: Dict[str, str] = {}
        self.visited: set = set()  # ids of parameter/buffer tensors a rule has consumed
        self.param_ids: set = set()
        self.module_stack: List[str] = []
        self.module_outputs: List[Tuple[str, List[int]]] = []  # (module name, dim nodes of its output)
        self.parents: Dict[int, List[int]] = {}  # id(tensor) -> ids of the tensors it was computed from
        self.value_events: List[Tuple[str, str, List[int]]] = []  # (op, module, ids of the tensors read)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        if name in VALUE_EVENTS:
            ts = [t for t in flatten_tensors((args, kwargs or {})) if torch.is_tensor(t)]
            for t in ts:
                self.of(t)  # unknown origin: registered (fixed, no lineage)
            where = (self.module_stack[-1] if self.module_stack else "") or "<the model's own forward>"
            self.value_events.append((name, where, [id(t) for t in ts]))
        return super().__torch_function__(func, types, args, kwargs)

    # -- node helpers ---------------------------------------------------------------------------
    def register(self, t: torch.Tensor, fixed: bool) -> List[int]:
        ns = [self.uf.new(s, fixed) for s in t.shape]
        self.nodes[id(t)] = ns
        self._keep.append(t)
        return ns

    def of(self, t: Any) -> List[int]:
        if not torch.is_tensor(t):
            return []
        ns = self.nodes.get(id(t))
        if ns is None or len(ns) != t.dim():
            ns = self.register(t, fixed=True)  # a tensor of unknown origin: nothing in it may move
        return ns

    def set_out(self, t: Any, ns: List[int]) -> None:
        if not torch.is_tensor(t):
            raise Unsupported("output is not a tensor")
        if len(ns) != t.dim() or any(self.uf.size[n] != s for n, s in zip(ns, t.shape)):
            raise Unsupported(f"rule produced {len(ns)} dims for an output of shape {tuple(t.shape)}")
        self.nodes[id(t)] = list(ns)
        self._keep.append(t)

    def fresh(self, size: int, fixed: bool) -> int:
        return self.uf.new(size, fixed)

    def union(self, a: int, b: int) -> None:
        self.uf.union(a, b)

    def _touch(self, *ts: Any) -> None:
        for t in ts:
            if torch.is_tensor(t) and id(t) in self.param_ids:
                self.visited.add(id(t))

    # -- dispatch -------------------------------------------------------------------------------
    def handle(self, name, func, args, kwargs):
        out = func(*args, **kwargs)
        tensors_in = [a for a in flatten_tensors((args, kwargs)) if torch.is_tensor(a)]
        tensors_out = [o for o in flatten_tensors(out) if torch.is_tensor(o)]
        if not tensors_out and not any(id(t) in self.param_ids for t in tensors_in):
            return out
        in_ids = [id(t) for t in tensors_in]
        for o in tensors_out:
            self.parents.setdefault(id(o), []).extend(i for i in in_ids if i != id(o))
        try:
            rule = self.rule_for(name)
            if rule is None:
                raise Unsupported(f"no rule for {name!r}")
            rule(self, name, args, kwargs, out)
            self._touch(*tensors_in)
        except Unsupported as exc:
            self._fallback(name, tensors_in, tensors_out, str(exc))
        return out

    # -- data-dependent control flow ------------------------------------------------------------
    def _leaf_roots(self, n: int, acc: set, seen: set) -> None:
        """Roots of the movable (unfixed, size > 1) leaf classes inside node ``n``'s layout."""
        r = self.uf.find(n)
        if r in seen:
            return
        seen.add(r)
        if self.uf.fixed[r] or self.uf.size[r] <= 1:
            return
        lay = self.uf.layout.get(r)
        if lay is None:
            acc.add(r)
            return
        for c in lay[1]:
            self._leaf_roots(c, acc, seen)

    def _movable_lineage(self, ids: List[int]) -> set:
        """Movable leaf roots of every dimension of the tensors ``ids`` and all their ancestors."""
        acc: set = set()
        seen_t: set = set()
        seen_n: set = set()
        stack = list(ids)
        while stack:
            tid = stack.pop()
            if tid in seen_t:
                continue
            seen_t.add(tid)
            for n in self.nodes.get(tid, ()):
                self._leaf_roots(n, acc, seen_n)
            stack.extend(self.parents.get(tid, ()))
        return acc

    def data_dependent(self) -> Tuple[Tuple[Tuple[str, str, int], ...], int]:
        """The value events whose tensors depend on a dimension of a permutation group, as
        ``((op, first module, count), ...)``, and the number of events that do not."""
        groups: set = set()
        seen: set = set()
        for tid in self.param_ids:
            for n in self.nodes.get(tid, ()):
                self._leaf_roots(n, groups, seen)
        flagged: Counter = Counter()
        first: Dict[str, str] = {}
        quiet = 0
        for name, where, ids in self.value_events:
            if groups and self._movable_lineage(ids) & groups:
                flagged[name] += 1
                first.setdefault(name, where)
            else:
                quiet += 1
        return tuple((op, first[op], n) for op, n in sorted(flagged.items())), quiet

    def _fallback(self, name: str, tin: List[torch.Tensor], tout: List[torch.Tensor], why: str) -> None:
        lost = False
        for t in tin:
            for n in self.of(t):
                r = self.uf.find(n)
                if not self.uf.fixed[r] and self.uf.size[r] > 1:
                    lost = True
                self.uf.fix(n)
        for t in tout:
            if id(t) not in self.nodes or len(self.nodes[id(t)]) != t.dim():
                self.register(t, fixed=True)
            else:
                for n in self.nodes[id(t)]:
                    self.uf.fix(n)
        if lost:
            where = self.module_stack[-1] if self.module_stack else "<top level>"
            self.blocked[name] += 1
            self.blocked_where.setdefault(name, f"{where} ({why})")
            log.debug("operation %s in %s fixed the dims it touched: %s", name, where, why)


def trace_dims(model: torch.nn.Module, example_inputs: Any) -> Tuple[PermutationSpec, DimTrace, Dict[int, List[str]]]:
    """Run ``model`` once on ``example_inputs`` under :class:`DimTrace` and build its spec.

    Returns ``(spec, trace, keys_by_tensor_id)``. The model runs in eval mode (restored afterwards)
    and without gradients; its parameters and buffers are not modified.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(
            "TorchScript modules run their operations in C++ where they cannot be followed; trace the "
            "eager model instead, or write the spec by hand with PermutationSpec.from_axes_to_perm"
        )
    by_id, tensors, persistent = tensor_keys(model)
    tr = DimTrace()
    for tid, keys in by_id.items():
        t = tensors[keys[0]]
        tr.register(t, fixed=not (t.is_floating_point() or t.is_complex()))  # integer buffers hold indices/counters
        tr.param_ids.add(tid)
    for t in flatten_tensors(example_inputs):
        if torch.is_tensor(t):
            tr.register(t, fixed=True)

    def record(module: str, out: Any) -> None:
        first = next((t for t in flatten_tensors(out) if torch.is_tensor(t)), None)
        if first is not None and id(first) in tr.nodes:
            tr.module_outputs.append((module, list(tr.nodes[id(first)])))

    try:
        out = traced_run(model, example_inputs, tr, tr.module_stack, on_output=record)
    except Unsupported as exc:  # pragma: no cover - rules catch their own
        raise TraceError(str(exc)) from exc
    except Exception as exc:
        where = tr.module_stack[-1] if tr.module_stack else "<top level>"
        raise TraceError(
            f"running the model on the example inputs failed in module {where!r}: {type(exc).__name__}: {exc}. "
            "Check the example inputs' shapes and types (a tensor, a tuple of positional inputs, or a dict of "
            "keyword inputs); if the model cannot run eagerly here, write the spec by hand with "
            "PermutationSpec.from_axes_to_perm"
        ) from exc
    for t in flatten_tensors(out):
        for n in tr.of(t):
            tr.uf.fix(n)
    for tid in tr.param_ids:
        if tid not in tr.visited:
            for n in tr.nodes[tid]:
                tr.uf.fix(n)
    spec = _build_spec(tr, by_id, tensors, persistent)
    return spec, tr, by_id


def _build_spec(tr: DimTrace, by_id, tensors, persistent) -> PermutationSpec:
    uf = tr.uf
    names: Dict[int, str] = {}
    used_names: set = set()

    def name_for(root: int, key: str, ax: int, path: Tuple[int, ...]) -> str:
        if root in names:
            return names[root]
        base = key.rsplit(".", 1)[0] if "." in key else key
        if ax != 0:
            base += f"@{ax}"
        if path:
            base += "#" + ".".join(map(str, path))
        cand, i = base, 2
        while cand in used_names:
            cand, i = f"{base}~{i}", i + 1
        used_names.add(cand)
        names[root] = cand
        return cand

    def resolve(node: int, key: str, ax: int, path: Tuple[int, ...]) -> Axis:
        r = uf.find(node)
        size = uf.size[r]
        lay = uf.layout.get(r)
        if lay is not None:
            kind, children = lay
            parts = tuple(resolve(c, key, ax, path + (i,)) for i, c in enumerate(children))
            if all(p.kind == "fixed" for p in parts):
                return Axis.fixed(size)
            merged: List[Axis] = []
            for p in parts:  # adjacent fixed parts read better as one: (c x ~4 x ~4) -> (c x ~16)
                if merged and p.kind == "fixed" and merged[-1].kind == "fixed":
                    n = merged[-1].size * p.size if kind == "product" else merged[-1].size + p.size
                    merged[-1] = Axis.fixed(n)
                else:
                    merged.append(p)
            return Axis(kind, size, parts=tuple(merged))
        if uf.fixed[r] or size <= 1:
            return Axis.fixed(size)
        return Axis.group(name_for(r, key, ax, path), size)

    groups: Dict[str, int] = {}
    axes: Dict[str, Tuple[Optional[Axis], ...]] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    order = [k for k in tensors if k in persistent] + [k for k in tensors if k not in persistent]
    key_to_id = {k: tid for tid, ks in by_id.items() for k in ks}
    for key in order:
        t = tensors[key]
        ns = tr.nodes[key_to_id[key]]
        lays = []
        for ax, n in enumerate(ns):
            a = resolve(n, key, ax, ())
            lays.append(None if a.kind == "fixed" else a)
            if a.kind != "fixed":
                for g, _ in a.groups():
                    groups.setdefault(g, next(p.size for p in _leaves(a) if p.name == g))
        if key not in persistent and all(l is None for l in lays):
            continue
        axes[key] = tuple(lays)
        shapes[key] = tuple(t.shape)
    points: Dict[str, List[Tuple[str, int]]] = {}
    for module, ns in tr.module_outputs:  # where each group is an axis of a module's output
        for dim, n in enumerate(ns):
            g = names.get(uf.find(n))
            if g is not None and g in groups and (module, dim) not in points.setdefault(g, []):
                points[g].append((module, dim))
    info = {
        "source": "traced",
        "points": {g: tuple(v) for g, v in points.items()},
        "blocked_ops": tuple(sorted(tr.blocked.items())),
        "blocked_where": dict(tr.blocked_where),
        "non_persistent": tuple(k for k in axes if k not in persistent),
        # tied weights (one tensor, several names): state_of keeps the first name
        "tied": {k: ks[0] for ks in by_id.values() if len(ks) > 1 for k in ks[1:] if k in axes},
    }
    info["data_dependent"], info["data_dependent_unflagged"] = tr.data_dependent()
    return PermutationSpec(groups=groups, axes=axes, shapes=shapes, info=info)


def _leaves(a: Axis):
    if a.kind == "group":
        yield a
    for p in a.parts:
        yield from _leaves(p)


