"""L^q path-norms of DAG ReLU networks and the path-norm generalization bound.

Gonon, Brisebarre, Riccietti & Gribonval, "A path-norm toolkit for modern networks: consequences,
promises and challenges", ICLR 2024, arXiv:2310.01225.

The path-lifting ``Phi(theta)`` of a DAG ReLU network has one coordinate per path of the network's
neuron graph: every path from an input neuron to an output neuron, **plus every path starting at a
hidden or output bias**. Its coordinate is the product of the weights along the path (times the bias
for bias paths). The L^q path-norm is

    ||Phi(theta)||_q = ( sum_p prod_{e in p} |theta_e|^q )^(1/q),    q >= 1.

Recipe (paper, Section 2 / Algorithm): replace every parameter by ``|.|^q``, replace max-pools by
sum-pools with the same geometry, feed an all-ones input and sum the outputs: the result is
``||Phi||_q^q`` (all pre-activations are >= 0, so the ReLUs act as the identity and skip connections add
their paths automatically).

What this implementation does differently from the published toolkit (Gonon, Brisebarre, Riccietti & Gribonval 2024,
ICLR, arXiv:2310.01225):

* BatchNorm (eval, running statistics) is an element-wise affine layer ``y = a x + b`` with
  ``a = gamma / sqrt(var + eps)`` and ``b = beta - a mu``; its edges get ``|a|^q`` and its bias
  ``|b|^q`` (the toolkit uses ``|beta| - |gamma||mu|/sqrt(var+eps)`` and ``|gamma|^q/sqrt(var^q+eps)``).
* Average pooling is a linear neuron with weight ``1/k`` on each of its ``k`` inputs, so each window
  sum is multiplied by ``(1/k)^q`` locally (equivalently forward ``* (1/k)^(q-1)``), before any root is
  taken; border windows with ``count_include_pad=False`` use their own divisor.
* No graph is traced and the user's model is only read: a float64 deep copy runs once, eagerly, in
  eval mode on an all-ones input under a :class:`torch.overrides.TorchFunctionMode` (like the
  toolkit's symmetry tracer ``weightspace.symmetry._trace``) that applies the recipe to each torch call as it
  happens, so Python control flow on shapes and flags just runs (``torch.fx`` cannot trace it).
  Activations are kept in a log-scaled form (value = tensor * exp(scale)), rescaled after every
  linear layer, so that networks whose path-norm overflows float32 (or even float64) still get an
  exact ``log_value``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from weightspace.checks import check_data, check_inputs, check_model
from weightspace.results import Result, records_time
from weightspace.utils import iter_batches, module_mode

from ._pathnorm_recipe import UnsupportedOperationError, _run_ones, _safe_exp

log = logging.getLogger(__name__)

__all__ = ["path_norm", "path_norm_bound", "PathNorm", "PathNormBound", "UnsupportedOperationError"]


@dataclass(frozen=True)
class PathNorm(Result):
    """Result of :func:`path_norm`.

    Attributes
    ----------
    value : float
        ``||Phi(theta)||_q`` (``math.inf`` if it does not fit in a float64; ``log_value`` stays exact).
    log_value : float
        Natural log of ``value``.
    q : float
        The exponent.
    settings : Mapping
        What was done: dtype, number of max-pools replaced by sum-pools, BatchNorms folded,
        average-pools corrected, input shape used.
    """

    value: float
    log_value: float
    q: float
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

    @property
    def value_q(self) -> float:
        """``||Phi||_q^q`` (the sum of the outputs of the recipe)."""
        return _safe_exp(self.q * self.log_value)

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        d["value_q"] = self.value_q
        return d


@dataclass(frozen=True)
class PathNormBound(Result):
    """Result of :func:`path_norm_bound` (see its docstring for every quantity)."""

    bound: float
    generalization_term: float
    empirical_risk: float
    constant_C: float
    first_part: float
    path_norm_l1: float
    lipschitz: float
    loss: str
    gamma: Optional[float]
    B: float
    n: int
    depth: int
    kernel_size: int
    n_pool_types: int
    d_in: int
    d_out: int
    theorem: str = "Gonon et al. 2024 (arXiv:2310.01225), Theorem 3.1"
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

@records_time
def path_norm(model: nn.Module, example_inputs, q: float = 1, *, device=None) -> PathNorm:
    """L^q path-norm ``||Phi(theta)||_q`` of a DAG ReLU network (Gonon et al., ICLR 2024, arXiv:2310.01225).

    Parameters
    ----------
    model : nn.Module
        Any module whose forward pass, run once in eval mode on one sample, is a DAG of: Linear /
        ``F.linear``, ``x @ W`` / ``einsum`` with one activation operand, Conv1d/2d/3d and transposed
        convs (any stride, padding, dilation, groups), BatchNorm with running statistics, ReLU
        (``relu``, ``relu_``, ``clamp(min=0)``), identity, dropout, max-pools (fixed or adaptive,
        1d/2d, ``amax`` over non-batch dims), average pools (fixed or adaptive, ``mean`` over non-batch
        dims), view/reshape/flatten/permute/indexing, ``cat``/``stack``, residual additions and
        subtractions, and multiplication by constants or parameters. Python control flow (on shapes,
        flags, loops) simply runs. Anything else applied to an activation (GELU, tanh, sigmoid,
        softmax, attention, LayerNorm, GroupNorm, a product of two activations, ...) raises
        :class:`UnsupportedOperationError` naming the operation and the module it ran in.
    example_inputs : Tensor or tuple of Tensors
        Inputs with a batch dimension; only their per-sample shapes are used.
    q : float
        Exponent, ``q >= 1`` (finite).
    device : optional
        Where to compute (default: the device of the model's parameters).

    Returns
    -------
    PathNorm
        ``value = ||Phi||_q``, ``log_value = log ||Phi||_q`` and the settings used (counts of the
        layers seen, BatchNorms folded, pools converted, depth).

    Notes
    -----
    ``||Phi||_q^q = sum_outputs N_{|theta|^q}(1)`` where ``N`` is the network with max-pools replaced by
    sum-pools, average pools weighted ``(1/k)^q`` per edge and BatchNorm folded to ``a x + b``
    (``a = gamma/sqrt(var+eps)``, ``b = beta - a mu``) with ``|a|^q, |b|^q``. The recipe is applied
    operation by operation while a float64 deep copy of the model runs on an all-ones input under a
    :class:`torch.overrides.TorchFunctionMode` (no ``torch.fx``): weights ``W`` of linear maps (whatever
    tensor is passed, parameter or derived, e.g. a weight-normed weight) are replaced by ``|W|^q``, and a
    constant added to a neuron (a bias parameter, a ``cls`` token concatenated to the tokens) counts as a
    bias ``|b|^q``. Activations are kept as ``t * exp(s)`` and rescaled after every linear layer, so the
    result never overflows (``log_value`` stays exact). The model itself is never modified (dtype,
    parameters, buffers and train/eval mode are untouched).

    Examples
    --------
    >>> import torch, analysis
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> pn = analysis.path_norm(net, torch.zeros(1, 2), q=2)   # doctest: +SKIP
    """
    model = check_model(model, where="analysis.path_norm")
    check_inputs(example_inputs, where="analysis.path_norm")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q < 1:
        raise ValueError(f"q must be a finite number >= 1, got {q!r} (q = inf is not implemented)")
    run = _run_ones(model, example_inputs, q, device)
    logs = []
    for t, s in run.leaves:
        tot = float(t.sum())
        if tot > 0:
            logs.append(math.log(tot) + s)
    if logs:
        m = max(logs)
        log_value = (m + math.log(sum(math.exp(v - m) for v in logs))) / q
    else:
        log_value = -math.inf
    rec = run.recipe
    settings = {"dtype": "float64", "input_shapes": [tuple(t.shape[1:]) for t in run.inputs],
                "recipe": "|theta|^q, max->sum pool, avg-pool (1/k)^q per edge, BN a=gamma/sqrt(var+eps), b=beta-a*mu",
                "tracer": "TorchFunctionMode (one eager float64 eval run)", "depth": rec.max_depth, **rec.counts}
    log.debug("path_norm q=%s: log value %.6g, %s", q, log_value, rec.counts)
    return PathNorm(value=_safe_exp(log_value), log_value=log_value, q=float(q), settings=settings)


# ----------------------------------------------------------------------------------------------
# generalization bound
# ----------------------------------------------------------------------------------------------
@records_time
def path_norm_bound(model: nn.Module, example_inputs, data, *, loss: str = "margin",
                    gamma: Optional[float] = None, t: float = 0.1, n: Optional[int] = None,
                    B: Optional[float] = None, depth: Optional[int] = None, kernel_size: Optional[int] = None,
                    n_pool_types: Optional[int] = None, lipschitz: Optional[float] = None,
                    device=None) -> PathNormBound:
    """Path-norm generalization bound of Gonon et al. (ICLR 2024, arXiv:2310.01225), Theorem 3.1.

    Bound evaluated (expected generalization error over the draw of the ``n`` training samples)::

        E[test loss - train loss] <= 4 * C * B * L * r / sqrt(n)
        C = sqrt( D log((3 + 2P) K) + log( (3 + 2P)/(1 + P) * (d_in + 1) * d_out ) )

    with ``r = ||Phi(theta)||_1`` (L1 path-norm of the model, :func:`path_norm` with ``q=1``), ``D`` the
    depth, ``P`` the number of distinct types of *-max-pooling neurons (1 if the model has max-pools,
    else 0), ``K`` the largest max-pool kernel size (number of inputs of a max-pooling neuron; 1 if
    none), ``d_in``/``d_out`` the per-sample input/output sizes, ``B`` the largest L-infinity norm of the
    inputs and ``L`` the Lipschitz constant (w.r.t. the L2 norm of the logits) of the loss.

    Returned ``bound = empirical_risk + 4 C B L r / sqrt(n)``:

    * ``loss="margin"`` (default): ramp loss ``min(1, max(0, 1 - M/gamma))`` of the margin
      ``M = f_y - max_{c != y} f_c``; it upper-bounds the top-1 error, so ``bound`` bounds the expected
      top-1 test error. ``L = sqrt(2)/gamma``. If ``gamma`` is None it is the quantile of the training
      margins at level ``(1 - t) err_train + t`` (the authors' scripts' choice).
    * ``loss="cross_entropy"``: ``L = sqrt(2)`` (the gradient softmax - e_y has L2 norm <= sqrt(2)).

    What is confirmed and what is not (be careful when quoting this bound):

    * ``C``, the factor ``4 / sqrt(n)`` and the conventions for ``D, K, P, B, d_in, d_out`` were checked
      against the authors' own script that evaluates "the 1st part of the generalization bound given in
      Theorem 3.1" (agonon/pathnorm_toolkit, ``compute_1st_part_bound_resnets.py``: D = 18..152 for
      ResNets, P = 1, K = 9 for their 3x3 max-pool, B = max L-inf input norm). The full theorem text
      (exact loss assumption) could NOT be read here; the form ``first_part * L * r`` is from memory.
    * The Lipschitz constants ``sqrt(2)/gamma`` and ``sqrt(2)`` are derived here, not taken from the
      paper. ``B`` is replaced by ``max(1, B)``: with biases ``|f(x)| <= ||Phi||_1 max(1, ||x||_inf)``,
      which is the conservative choice (identical to the script when ``B >= 1``).
    * ``D`` is the longest chain of linear layers (Linear/Conv/matmul; BatchNorm is folded, not
      counted: the scripts' convention), ``K`` counts adaptive max-pool windows and ``amax`` too, ``r`` is the
      path-norm of the trained model although the theorem needs ``r`` fixed before seeing the data,
      and choosing ``gamma`` from the data also needs a union bound; neither correction is applied,
      as in the paper's experiments.

    Parameters
    ----------
    model : nn.Module
        A ReLU DAG network supported by :func:`path_norm`, returning (batch, classes) logits.
    data : (X, Y) or iterable of (x, y)
        The training samples (used for ``n``, ``B``, the margins and the empirical risk).
    example_inputs : Tensor or None
        Inputs with a batch dimension (their per-sample shape gives ``d_in``); None uses the first
        batch of ``data``.
    """
    model = check_model(model, where="analysis.path_norm_bound")
    if example_inputs is not None:
        check_inputs(example_inputs, where="analysis.path_norm_bound")
    check_data(data, where="analysis.path_norm_bound")
    if loss not in ("margin", "cross_entropy"):
        raise ValueError(f"loss must be 'margin' or 'cross_entropy', got {loss!r}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    if gamma is not None and not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    margins, ce, Bdata, count = [], [], 0.0, 0
    with module_mode(model), torch.no_grad():
        for x, y in iter_batches(data, device):
            if y is None:
                raise ValueError("path_norm_bound needs labelled data: pass (X, Y) or (x, y) batches")
            if example_inputs is None:
                example_inputs = x[:1]
            if not torch.isfinite(x).all():
                raise ValueError("data contains NaN or inf inputs")
            logits = model(x)
            if logits.dim() != 2:
                raise ValueError(f"path_norm_bound needs (batch, classes) logits, got shape {tuple(logits.shape)}")
            y = y.long().reshape(-1)
            if (y < 0).any() or (y >= logits.shape[1]).any():
                raise ValueError(f"labels out of range [0, {logits.shape[1]}): min {int(y.min())}, max {int(y.max())}")
            fy = logits.gather(1, y[:, None]).squeeze(1)
            other = logits.clone()
            other.scatter_(1, y[:, None], -math.inf)
            margins.append((fy - other.max(1).values).double().cpu())
            ce.append(F.cross_entropy(logits.double(), y, reduction="none").cpu())
            Bdata = max(Bdata, float(x.abs().max()))
            count += x.shape[0]
    M = torch.cat(margins)
    n_eff = int(n) if n is not None else count
    B_eff = max(1.0, float(B) if B is not None else Bdata)
    run = _run_ones(model, example_inputs, 1.0, device)
    rec = run.recipe
    D = int(depth) if depth is not None else rec.max_depth
    K = int(kernel_size) if kernel_size is not None else rec.K
    P = int(n_pool_types) if n_pool_types is not None else len(rec.pool_types)
    d_in = sum(math.prod(t_.shape[1:]) for t_ in run.inputs)
    d_out = sum(t_.numel() for t_, _ in run.leaves)
    r = path_norm(model, example_inputs, q=1, device=device).value
    C = math.sqrt(D * math.log((3 + 2 * P) * K) + math.log((3 + 2 * P) / (1 + P) * (d_in + 1) * d_out))
    first = 4.0 * C * B_eff / math.sqrt(n_eff)
    err_train = float((M <= 0).double().mean())
    if loss == "margin":
        if gamma is None:
            level = (1 - t) * err_train + t
            gamma = float(torch.quantile(M, min(max(level, 0.0), 1.0)))
            if not gamma > 0:
                raise ValueError(f"the margin quantile at level {level:.3f} is {gamma:.4g} <= 0; pass gamma > 0 "
                                 "or a larger t")
        L = math.sqrt(2.0) / gamma if lipschitz is None else float(lipschitz)
        emp = float((1 - M / gamma).clamp(0, 1).mean())
    else:
        L = math.sqrt(2.0) if lipschitz is None else float(lipschitz)
        emp = float(torch.cat(ce).mean())
        gamma = None
    gen = first * L * r
    settings = {"t": t, "train_error": err_train, "B_data": Bdata, "B_used": B_eff,
                "depth_convention": "longest chain of Linear/Conv layers", "n_given": n is not None}
    return PathNormBound(bound=emp + gen, generalization_term=gen, empirical_risk=emp, constant_C=C,
                         first_part=first, path_norm_l1=r, lipschitz=L, loss=loss, gamma=gamma, B=B_eff,
                         n=n_eff, depth=D, kernel_size=K, n_pool_types=P, d_in=int(d_in), d_out=int(d_out),
                         settings=settings)
