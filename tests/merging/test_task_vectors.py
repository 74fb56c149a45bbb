"""Task-vector merges (task_arithmetic, ties, dare_linear, dare_ties) against closed forms and against
independent re-implementations of the mergekit and FusionBench conventions."""

from collections import OrderedDict

import pytest
import torch

import merging
from merging.task_vectors import global_thresholds


def _merge(*models, **kw):
    return merging.merge(*models, **kw).state_dict


def _rand_state(g, shapes, scale=1.0):
    return OrderedDict((k, torch.randn(s, generator=g, dtype=torch.float64) * scale) for k, s in shapes.items())


SHAPES = {"l1.weight": (7, 5), "l1.bias": (7,), "l2.weight": (3, 7), "l2.bias": (3,)}


@pytest.fixture()
def task_models():
    g = torch.Generator().manual_seed(0)
    base = _rand_state(g, SHAPES)
    fts = [
        OrderedDict((k, v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)) for k, v in base.items())
        for _ in range(3)
    ]
    return base, fts


# --------------------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------------------
def test_task_arithmetic_closed_form_and_weights(task_models):
    base, fts = task_models
    out = _merge(*fts, base=base, method="task_arithmetic", scaling=0.3)
    for k in base:
        want = base[k] + 0.3 * sum(ft[k] - base[k] for ft in fts)
        torch.testing.assert_close(out[k], want, rtol=0, atol=1e-12)
    w = [0.5, 0.3, 0.2]
    out_w = _merge(*fts, base=base, method="task_arithmetic", weights=w, scaling=1.0)
    for k in base:  # weights are relative task coefficients c_k = N w_k
        want = base[k] + sum(3 * wk * (ft[k] - base[k]) for wk, ft in zip(w, fts))
        torch.testing.assert_close(out_w[k], want, rtol=0, atol=1e-12)
    # one fine-tuned model with scaling 1 is that model; scaling -1 is task negation
    one = _merge(fts[0], base=base, method="task_arithmetic")
    neg = _merge(fts[0], base=base, method="task_arithmetic", scaling=-1.0)
    for k in base:
        torch.testing.assert_close(one[k], fts[0][k], rtol=0, atol=1e-12)
        torch.testing.assert_close(neg[k], 2 * base[k] - fts[0][k], rtol=0, atol=1e-12)


# delta_1, delta_2, delta_3 worked by hand (base 0 is shifted to base b below)
D = torch.tensor([[1.0, -2.0, 3.0, 0.5], [2.0, 1.5, -1.0, -0.5], [-4.0, 3.0, -1.0, 0.5]], dtype=torch.float64)


@pytest.mark.parametrize(
    "density,merge_mode,expected",
    [
        # no trim: sums (-1, 2.5, 1, .5) elect (-, +, +, +)
        (1.0, "mean", [-4.0, 2.25, 3.0, 0.5]),
        (1.0, "sum", [-4.0, 4.5, 3.0, 1.0]),
        # density .5 keeps the 2 largest |.| per task: (0,-2,3,0), (2,1.5,0,0), (-4,3,0,0); sums (-2, 2.5, 3, 0)
        (0.5, "mean", [-4.0, 2.25, 3.0, 0.0]),
        (0.5, "sum", [-4.0, 4.5, 3.0, 0.0]),
    ],
)
def test_ties_closed_form(density, merge_mode, expected):
    b = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64)
    base = {"w": b}
    fts = [{"w": b + D[k]} for k in range(3)]
    out = _merge(*fts, base=base, method="ties", density=density, merge=merge_mode, scaling=0.5)["w"]
    torch.testing.assert_close(out, b + 0.5 * torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # the same with the other trim convention: one tensor, so global == per-tensor here
    out_g = _merge(*fts, base=base, method="ties", density=density, merge=merge_mode, scaling=0.5, trim="global")["w"]
    torch.testing.assert_close(out_g, out, rtol=0, atol=0)


def test_ties_global_differs_from_per_tensor_closed_form():
    base = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    ft = {
        "a": torch.tensor([5.0, -1.0, 0.2], dtype=torch.float64),
        "b": torch.tensor([-3.0, 0.1, 2.0], dtype=torch.float64),
    }
    # global: 6 entries, density .5 -> the 3 largest |.| of the whole vector: 5, -3, 2
    g = _merge(ft, base=base, method="ties", density=0.5, trim="global")
    torch.testing.assert_close(g["a"], torch.tensor([5.0, 0, 0], dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(g["b"], torch.tensor([-3.0, 0, 2.0], dtype=torch.float64), rtol=0, atol=0)
    # per tensor: max(1, floor(.5 * 3)) = 1 entry of each tensor
    p = _merge(ft, base=base, method="ties", density=0.5, trim="per_tensor")
    torch.testing.assert_close(p["a"], torch.tensor([5.0, 0, 0], dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(p["b"], torch.tensor([-3.0, 0, 0], dtype=torch.float64), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# independent reference implementations of the two published conventions
# --------------------------------------------------------------------------------------------------
def _mergekit_ties(base, fts, weights, density, lam):
    """mergekit's ties: per-tensor top-k (k = int(density * numel)) by argsort, sign = sign(sum w d) with
    0 -> +, mask sign(d) == sign, sum(w d m) / sum(w m)."""
    out = {}
    for k, b in base.items():
        ds = []
        for ft in fts:
            d = ft[k] - b
            kk = int(density * d.numel())
            mask = torch.zeros(d.numel(), dtype=torch.bool)
            mask[torch.argsort(d.abs().reshape(-1), descending=True)[:kk]] = True
            ds.append(d * mask.reshape(d.shape))
        w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * b.dim()))
        stack = torch.stack(ds)
        sign = torch.where((w * stack).sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
        m = (torch.sign(stack) == sign).to(stack.dtype)
        div = (w * m).sum(0)
        div[div == 0] = 1
        out[k] = b + lam * (w * stack * m).sum(0) / div
    return out


def _fusionbench_ties(base, fts, density, lam):
    """FusionBench-style ties: each task vector flattened over the sorted keys, global top-k by magnitude
    (k = floor(density * n), exactly k kept), sign(sum) elected, disjoint SUM."""
    keys = sorted(base)
    flat = torch.stack([torch.cat([(ft[k] - base[k]).reshape(-1) for k in keys]) for ft in fts])
    n = flat.shape[1]
    kk = int(density * n)
    masks = torch.zeros_like(flat, dtype=torch.bool)
    for t in range(flat.shape[0]):
        masks[t, torch.topk(flat[t].abs(), kk).indices] = True
    trimmed = flat * masks
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0)
    out, i = {}, 0
    for k in keys:
        m = base[k].numel()
        out[k] = base[k] + lam * merged[i : i + m].reshape(base[k].shape)
        i += m
    return out


@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2]])
def test_ties_per_tensor_mean_equals_mergekit_convention(task_models, weights):
    base, fts = task_models
    w = weights or [1 / 3] * 3
    # density .4 keeps >= 1 entry of every tensor under both counts (mergekit refuses k = 0)
    out = _merge(*fts, base=base, method="ties", density=0.4, scaling=0.7, weights=weights)
    ref = _mergekit_ties(base, fts, w, 0.4, 0.7)
    for k in base:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-12)


def test_ties_global_sum_equals_fusionbench_convention(task_models):
    base, fts = task_models
    out = _merge(*fts, base=base, method="ties", density=0.2, scaling=0.3, trim="global", merge="sum")
    ref = _fusionbench_ties(base, fts, 0.2, 0.3)
    for k in base:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-12)
    # negative control: the per-tensor trim is a different merge on the same inputs
    per = _merge(*fts, base=base, method="ties", density=0.2, scaling=0.3, trim="per_tensor", merge="sum")
    assert any(not torch.allclose(per[k], ref[k]) for k in base)


def test_ties_invariant_to_model_order_with_weights(task_models):
    base, fts = task_models
    w = [0.5, 0.3, 0.2]
    a = _merge(*fts, base=base, method="ties", weights=w, density=0.4)
    b = _merge(fts[2], fts[0], fts[1], base=base, method="ties", weights=[w[2], w[0], w[1]], density=0.4)
    for k in base:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)
    c = _merge(*fts, base=base, method="ties", weights=[0.2, 0.3, 0.5], density=0.4)  # control: weights matter
    assert any(not torch.allclose(a[k], c[k]) for k in base)


# --------------------------------------------------------------------------------------------------
# exact global threshold (radix selection) == in-memory top-k
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_global_threshold_equals_topk(dtype):
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(s, generator=g).to(dtype) for s in [(300,), (40, 25), (7,), (2, 3, 50)]]
    chunks[1][:5, :] = 0.0  # exact zeros and duplicates
    chunks[2][:] = chunks[0][:7]
    vals = torch.cat([c.reshape(-1).to(torch.float64) for c in chunks]).abs()
    n = vals.numel()
    wide = dtype == torch.float64
    for density in (0.013, 0.2, 0.5, 0.97, 1.0):
        k = int(density * n + 1e-9)
        got = global_thresholds(lambda: ([c] for c in chunks), [n], density, wide=wide)[0]
        want = float(torch.topk(vals, k).values.min()) if k < n else 0.0
        assert got == want, (density, got, want)
    # several task vectors at once, with different counts
    second = [c * 3 for c in chunks]
    got = global_thresholds(lambda: ([a, b] for a, b in zip(chunks, second)), [n, n], 0.1, wide=wide)
    k = int(0.1 * n)
    assert got[0] == float(torch.topk(vals, k).values.min())
    assert got[1] == float(torch.topk(torch.cat([c.reshape(-1).double() for c in second]).abs(), k).values.min())


def test_global_trim_keeps_exactly_k_entries(task_models):
    base, fts = task_models
    n = sum(v.numel() for v in base.values())
    out = _merge(fts[0], base=base, method="ties", density=0.25, trim="global")
    kept = sum(int((out[k] != base[k]).sum()) for k in base)
    assert kept == int(0.25 * n)


# --------------------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------------------
def test_dare_drop_rate_rescale_and_seeding():
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.zeros(400, 500)}
    ft = {"w": torch.randn(400, 500, generator=g)}
    density = 0.3
    out = _merge(ft, base=base, method="dare_linear", density=density, seed=5)["w"]
    kept = out != 0
    n = kept.numel()
    frac = kept.float().mean().item()
    sd = (density * (1 - density) / n) ** 0.5
    assert abs(frac - density) < 6 * sd  # Bernoulli(density) keep rate
    torch.testing.assert_close(out[kept], ft["w"][kept] / density, rtol=1e-6, atol=0)  # 1/density rescale
    again = _merge(ft, base=base, method="dare_linear", density=density, seed=5)["w"]
    assert torch.equal(out, again)  # one seed, one result
    other = _merge(ft, base=base, method="dare_linear", density=density, seed=6)["w"]
    assert not torch.equal(other != 0, kept)  # another seed, another mask
    l1 = _merge(ft, base=base, method="dare_linear", density=density, seed=5, rescale="l1")["w"]
    torch.testing.assert_close(l1.abs().sum(), ft["w"].abs().sum(), rtol=1e-5, atol=0)  # mergekit's norm match
    assert torch.equal(l1 != 0, kept)  # same mask, other rescale
    none = _merge(ft, base=base, method="dare_linear", density=density, seed=5, rescale="none")["w"]
    torch.testing.assert_close(none[kept], ft["w"][kept], rtol=0, atol=0)


def test_dare_unbiased_over_seeds():
    base = {"w": torch.zeros(64, dtype=torch.float64)}
    ft = {"w": torch.linspace(-1, 1, 64, dtype=torch.float64)}
    mean = sum(_merge(ft, base=base, method="dare_linear", density=0.5, seed=s)["w"] for s in range(400)) / 400
    # E[DARE(delta)] = delta; each entry averages 400 draws of delta * {0, 2}: sd = |delta| / 20
    assert ((mean - ft["w"]).abs() <= 5 * ft["w"].abs() / 20 + 1e-12).all()


def test_dare_masks_independent_of_key_order_and_subsets(task_models):
    base, fts = task_models
    full = _merge(*fts, base=base, method="dare_ties", density=0.4, seed=3)
    keys = list(base)[::-1]
    rev = _merge(
        *[OrderedDict((k, ft[k]) for k in keys) for ft in fts],
        base=OrderedDict((k, base[k]) for k in keys),
        method="dare_ties",
        density=0.4,
        seed=3,
    )
    for k in base:
        assert torch.equal(full[k], rev[k])
        sub = _merge(*[{k: ft[k]} for ft in fts], base={k: base[k]}, method="dare_ties", density=0.4, seed=3)
        assert torch.equal(sub[k], full[k])  # elementwise: one key alone gives the same values (streaming)


def test_density_one_reduces_dare_to_plain_methods(task_models):
    base, fts = task_models
    lin = _merge(*fts, base=base, method="dare_linear", density=1.0, scaling=0.4)
    ta = _merge(*fts, base=base, method="task_arithmetic", scaling=0.4)
    dt = _merge(*fts, base=base, method="dare_ties", density=1.0)
    ti = _merge(*fts, base=base, method="ties", density=1.0)
    for k in base:
        torch.testing.assert_close(lin[k], ta[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(dt[k], ti[k], rtol=0, atol=0)


def test_identical_fine_tunes_merge_to_themselves(task_models):
    base, fts = task_models
    for method in ("ties", "dare_ties"):
        out = _merge(fts[0], fts[0], fts[0], base=base, method=method, density=1.0)
        for k in base:
            torch.testing.assert_close(out[k], fts[0][k], rtol=0, atol=1e-12)


def test_modules_and_integer_buffers():
    torch.manual_seed(0)
    mk = lambda: torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))  # noqa: E731
    base, a, b = mk(), mk(), mk()
    for m in (a, b):
        m[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    res = merging.merge(a, b, base=base, method="ties", density=0.5)
    assert isinstance(res.model, torch.nn.Sequential)
    assert int(res.state_dict["1.num_batches_tracked"]) == 7  # integer buffers from model_a
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())  # inputs untouched


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_errors_name_the_problem(task_models):
    base, fts = task_models
    with pytest.raises(ValueError, match="needs base="):
        merging.merge(*fts, method="ties")
    with pytest.raises(ValueError, match="density"):
        merging.merge(*fts, base=base, method="ties", density=0.0)
    with pytest.raises(ValueError, match="density"):
        merging.merge(*fts, base=base, method="dare_linear", density=1.5)
    with pytest.raises(ValueError, match="scaling"):
        merging.merge(*fts, base=base, method="task_arithmetic", scaling=float("nan"))
    with pytest.raises(ValueError, match="trim"):
        merging.merge(*fts, base=base, method="ties", trim="layer")
    with pytest.raises(ValueError, match="rescale"):
        merging.merge(*fts, base=base, method="dare_ties", rescale="l2")
    with pytest.raises(ValueError, match="merge"):
        merging.merge(*fts, base=base, method="ties", merge="max")
    with pytest.raises(ValueError, match="lamda"):
        merging.merge(*fts, base=base, method="ties", lamda=0.3)  # unknown option listed
    bad_base = dict(base)
    bad_base.pop("l2.bias")
    with pytest.raises(ValueError, match="l2.bias"):
        merging.merge(*fts, base=bad_base, method="task_arithmetic")


def test_registry_records_papers():
    ms = merging.methods()
    for name, arxiv in (
        ("task_arithmetic", "2212.04089"),
        ("ties", "2306.01708"),
        ("dare_linear", "2311.03099"),
        ("dare_ties", "2311.03099"),
    ):
        info = ms[name]
        assert arxiv in info.paper and info.needs == ("base",) and info.elementwise
    assert ms["ties"].options == {"density": 0.2, "scaling": 1.0, "trim": "per_tensor", "merge": "mean"}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "method,opts",
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.3, "trim": "global"}),
        ("dare_linear", {}),
        ("dare_ties", {"rescale": "l1"}),
    ],
)
def test_cuda_matches_cpu(task_models, method, opts):
    base, fts = task_models
    cpu = merging.merge(*fts, base=base, method=method, device="cpu", seed=1, **opts)
    gpu = merging.merge(*fts, base=base, method=method, device="cuda", seed=1, **opts)
    for k in base:  # same masks and thresholds (selection is exact), sums up to float64 round-off
        torch.testing.assert_close(gpu.state_dict[k].cpu(), cpu.state_dict[k], rtol=0, atol=1e-12)
    if opts.get("trim") == "global":
        assert gpu.log["method"]["global_thresholds"] == cpu.log["method"]["global_thresholds"]
