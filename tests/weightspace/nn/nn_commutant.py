"""Test oracles for equivariant layers, independent of the layer code.

* :func:`orbit_count` -- the dimension of the commutant of a permutation representation is the number
  of orbits of the group on pairs of coordinates; the orbits are found by union-find over group
  generators (a transposition and an n-cycle per group generate S_n).
* :func:`layer_span` -- the linear maps a layer expresses over random parameter draws: each map is
  materialised as a D x D matrix by applying the layer (bias removed) to the D one-hot networks; it
  returns the rank of their span and the largest commutation defect ``|P M P^T - M|``.
"""

import torch

import weightspace as ws
from weightspace import nn as wsnn


def index_batch(spec, keys, dtype=torch.float64):
    """One network whose weights are their own flat coordinate indices."""
    tensors, off = {}, 0
    for k in keys:
        shape = tuple(spec.shapes[k])
        n = int(torch.Size(shape).numel())
        tensors[k] = torch.arange(off, off + n, dtype=dtype).reshape(1, *shape, 1)
        off += n
    return wsnn.WeightSpaceBatch(spec, tensors), off


def generators(spec):
    """For each group: a transposition (0 1) and the n-cycle, others identity."""
    gens = []
    ident = ws.identity_permutation(spec)
    for g, n in spec.groups.items():
        if n < 2:
            continue
        t = torch.arange(n)
        t[0], t[1] = 1, 0
        c = torch.roll(torch.arange(n), 1)
        for p in (t, c):
            perms = dict(ident)
            perms[g] = p
            gens.append(perms)
    return gens


def coordinate_maps(spec, keys):
    """Each generator as a LongTensor ``src`` with ``permuted[i] = original[src[i]]``."""
    batch, D = index_batch(spec, keys)
    return [batch.permute(p).flatten()[0].round().long() for p in generators(spec)], D


def orbit_count(spec, keys):
    maps, D = coordinate_maps(spec, keys)
    parent = list(range(D * D))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for src in maps:
        s = src.tolist()
        for i in range(D):
            si = s[i] * D
            row = i * D
            for j in range(D):
                a, b = find(row + j), find(si + s[j])
                if a != b:
                    parent[a] = b
    return len({find(x) for x in range(D * D)})


def layer_matrices(layer, spec, keys, D):
    """The K matrices (K, D, D) of a bias-free linear layer with 1 input and K output channels:
    output channel c is the map ``M_c[out, in]``, each with its own parameters."""
    eye = torch.eye(D, dtype=torch.float64)
    tensors, off = {}, 0
    for k in keys:
        shape = tuple(spec.shapes[k])
        n = int(torch.Size(shape).numel())
        tensors[k] = eye[:, off : off + n].reshape(D, *shape, 1)
        off += n
    batch = wsnn.WeightSpaceBatch(spec, tensors)
    with torch.no_grad():
        out = layer(batch).flatten()  # (D inputs, D outputs * K), channels last
    return out.reshape(D, D, -1).permute(2, 1, 0)  # (K, out, in)


def layer_span(make_layer, spec, keys, draws):
    """(rank of the span of the maps of ``draws`` independently drawn layers, max commutation defect).

    ``make_layer(k)`` builds the layer with 1 input and ``k`` output channels; each output channel
    has its own parameters, so one forward gives ``k`` independent draws. They are re-drawn from a
    standard normal; the layer is linear in them, so ``draws`` >= the commutant's dimension generic
    draws span everything the layer can express (with probability one)."""
    maps, D = coordinate_maps(spec, keys)
    layer = make_layer(draws).double()
    g = torch.Generator().manual_seed(1000)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    Ms = layer_matrices(layer, spec, keys, D)
    defect = 0.0
    for src in maps:
        defect = max(defect, (Ms[:, src][:, :, src] - Ms).abs().max().item())  # (P M P^T)[i,j] = M[src i, src j]
    A = Ms.reshape(draws, -1)
    A = A / A.norm(dim=1, keepdim=True)
    # rank through the (draws x draws) Gram matrix: an eigenproblem, much cheaper than the SVD of A
    return torch.linalg.matrix_rank(A @ A.T, hermitian=True, rtol=1e-10).item(), defect


def coordinate_orbit_count(spec, keys):
    """Orbits of the group on single coordinates (the dimension of the invariant vectors)."""
    maps, D = coordinate_maps(spec, keys)
    parent = list(range(D))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for src in maps:
        for i, j in enumerate(src.tolist()):
            a, b = find(i), find(j)
            if a != b:
                parent[a] = b
    return len({find(x) for x in range(D)})
