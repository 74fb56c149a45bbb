"""Union-find over tensor dimensions with structured layouts (products and concatenations).

Each dimension of each traced tensor is a node; equal-size nodes that must move together are joined.
A class may carry a layout -- ``product`` (a reshape merged or split it) or ``concat`` (a concatenation
or split) of child classes -- and fixing a class fixes its children. Joining two classes with layouts
unifies the layouts, on their common refinement when the factor sizes differ.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple


class _UF:
    def __init__(self) -> None:
        self.parent: List[int] = []
        self.size: List[int] = []
        self.fixed: List[bool] = []
        self.layout: Dict[int, Tuple[str, List[int]]] = {}

    def new(self, size: int, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.fixed.append(bool(fixed))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def fix(self, a: int) -> None:
        r = self.find(a)
        if self.fixed[r]:
            return
        self.fixed[r] = True
        lay = self.layout.get(r)
        if lay is not None:
            for c in lay[1]:
                self.fix(c)

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            # equal-size joins only; a size conflict means the rule misread the op: be conservative
            self.fix(ra)
            self.fix(rb)
            return ra
        la, lb = self.layout.pop(ra, None), self.layout.pop(rb, None)
        self.parent[rb] = ra
        fixed = self.fixed[ra] or self.fixed[rb]
        self.fixed[ra] = False
        if la is not None and lb is not None:
            self.layout[ra] = la
            self._unify(la, lb, ra)
        elif la is not None or lb is not None:
            self.layout[ra] = la if la is not None else lb
        if fixed:
            self.fix(ra)
        return ra

    def _unify(self, la, lb, root: int) -> None:
        (ka, ca), (kb, cb) = la, lb
        sa, sb = [self.size[c] for c in ca], [self.size[c] for c in cb]
        if ka == kb and sa == sb:
            for x, y in zip(ca, cb):
                self.union(x, y)
            return
        if ka == kb:
            refined = _common_refinement(sa, sb, additive=(ka == "concat"))
            if refined is not None:
                # both structures hold on a common refinement (a subgroup of each): e.g. GroupNorm's
                # (4 groups x 2) and a grouped conv's (2 groups x 4) meet at 2 x 2 x 2
                parts = [self.new(s) for s in refined]
                self.layout[root] = (ka, parts)
                for children, sizes in ((ca, sa), (cb, sb)):
                    j = 0
                    for c, s in zip(children, sizes):
                        acc, start = (0 if ka == "concat" else 1), j
                        while acc != s:
                            acc = acc + refined[j] if ka == "concat" else acc * refined[j]
                            j += 1
                        self.set_layout(c, ka, parts[start:j])
                return
        # two incompatible structures on one axis: nothing inside can move
        for c in ca + cb:
            self.fix(c)
        self.fix(root)

    def set_layout(self, a: int, kind: str, children: List[int]) -> None:
        """Declare that class ``a`` is ``kind`` (product/concat) of ``children`` (size-1/0 parts dropped)."""
        children = [c for c in children if self.size[c] != (1 if kind == "product" else 0)]
        if len(children) == 1:
            self.union(a, children[0])
            return
        if not children:
            return
        r = self.find(a)
        if r in self.layout:
            self._unify(self.layout[r], (kind, children), r)
        else:
            self.layout[r] = (kind, children)
            if self.fixed[r]:
                for c in children:
                    self.fix(c)


def _common_refinement(a: List[int], b: List[int], additive: bool) -> Optional[List[int]]:
    """Sizes of the coarsest factor list that refines both ``a`` and ``b`` (None if there is none).

    For products the prefix products of both lists must form one divisibility chain; for
    concatenations the prefix sums simply merge.
    """
    def prefixes(xs):
        out, acc = [], 0 if additive else 1
        for x in xs:
            acc = acc + x if additive else acc * x
            out.append(acc)
        return out

    cuts = sorted(set(prefixes(a)) | set(prefixes(b)))
    sizes, prev = [], 0 if additive else 1
    for c in cuts:
        if additive:
            sizes.append(c - prev)
        else:
            if c % prev:
                return None
            sizes.append(c // prev)
        prev = c
    return sizes
