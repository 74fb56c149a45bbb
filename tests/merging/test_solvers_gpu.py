"""CUDA paths against the CPU reference (skipped without CUDA by tests/conftest.py)."""
import numpy as np
import pytest
import torch

import merging.solvers as S

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("shape", [(16, 32, 32), (4, 10, 17), (4, 17, 10), (1, 1, 1), (8, 64, 64)])
def test_lap_cuda_matches_scipy(shape, maximize):
    gen = torch.Generator().manual_seed(0)
    C = torch.rand(shape, generator=gen, dtype=torch.float64)
    C[: shape[0] // 2] = torch.randint(0, 3, C[: shape[0] // 2].shape, generator=gen).double()  # ties
    ref = S.linear_assignment(C.numpy(), maximize=maximize, method="scipy")
    for method in ("torch", "auto", "scipy"):
        res = S.linear_assignment(C.cuda(), maximize=maximize, method=method)
        assert res.col_ind.is_cuda and res.row_ind.is_cuda and res.objective.is_cuda
        np.testing.assert_allclose(res.objective.cpu().numpy(), ref.objective, rtol=1e-9, atol=1e-12)
        cols = res.col_ind.cpu().numpy()
        assert all(len(set(c.tolist())) == cols.shape[1] for c in cols)


def test_hierarchical_cuda_matches_cpu():
    C4 = torch.rand(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cpu = S.hierarchical_assignment(C4, method="scipy")
    gpu = S.hierarchical_assignment(C4.cuda(), method="torch")
    assert gpu.head_cols.is_cuda
    assert np.isclose(float(gpu.objective), float(cpu.objective), rtol=1e-12)


def test_sinkhorn_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    M = torch.rand(5, 12, 9, dtype=torch.float64, generator=gen)
    a = torch.rand(5, 12, dtype=torch.float64, generator=gen) + 0.1
    a = a / a.sum(1, keepdim=True)
    cpu = S.sinkhorn(M, a, reg=0.05)
    gpu = S.sinkhorn(M.cuda(), a.cuda(), reg=0.05)
    assert gpu.plan.is_cuda and gpu.cost.is_cuda and gpu.converged.is_cuda
    assert bool(gpu.converged.all())
    torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, atol=1e-10, rtol=0)
    perm = S.round_to_permutation(gpu.plan[:, :9, :9].contiguous())
    assert perm.is_cuda


def test_emd_cuda_input_returns_cuda():
    M = torch.rand(2, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cpu = S.emd(M)
    gpu = S.emd(M.cuda())
    assert gpu.plan.is_cuda and gpu.cost.is_cuda
    torch.testing.assert_close(gpu.cost.cpu(), cpu.cost, rtol=1e-12, atol=0)


def test_sinkhorn_padded_list_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(3)
    costs = [torch.rand(5, 7, dtype=torch.float64, generator=gen), torch.rand(9, 4, dtype=torch.float64, generator=gen)]
    cpu = S.sinkhorn(costs, reg=0.1, pad=True)
    gpu = S.sinkhorn([c.cuda() for c in costs], reg=0.1, pad=True)
    for c, g in zip(cpu, gpu):
        assert g.plan.is_cuda
        np.testing.assert_allclose(g.plan.cpu().numpy(), c.plan.numpy(), atol=1e-8)
