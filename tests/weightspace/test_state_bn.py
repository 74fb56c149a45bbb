"""BatchNorm folding in weightspace.state: exact against the eval model, only sole-consumer pairs."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from weightspace.state import batchnorm_pairs, bn_affine, fold_batchnorm


def _randomize_bn(model, g):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.3)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


class Branchy(nn.Module):
    """conv -> bn (foldable); lin -> bn2 but lin's output is also used by a skip (not foldable)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.lin, self.bn2 = nn.Linear(3, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        h = self.bn(self.conv(x)).mean((2, 3))
        z = self.lin(h)
        return self.bn2(z) + z


def test_fold_is_exact_for_conv_and_linear_and_matches_bn_affine():
    g = torch.Generator().manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                        nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5)), g)
    x = torch.randn(3, 2, 6, 6, generator=g)
    folded = fold_batchnorm(model, x)
    assert set(folded) == {"0", "4"}
    W0, c0 = folded["0"]
    W4, c4 = folded["4"]
    h = F.relu(F.conv2d(x.double(), W0, c0)).flatten(1)
    out = h @ W4.T + c4
    with torch.no_grad():
        assert torch.allclose(out, model(x).double(), atol=1e-10)
    a, b = bn_affine(model[5].running_mean, model[5].running_var, model[5].weight, model[5].bias, model[5].eps)
    z = torch.randn(7, 5, generator=g)
    with torch.no_grad():
        assert torch.allclose(a * z.double() + b, model[5](z).double(), atol=1e-12)
    assert fold_batchnorm(model).keys() == folded.keys()  # torch.fx route agrees with the eager run


def test_pairs_skip_outputs_with_other_consumers():
    g = torch.Generator().manual_seed(1)
    model = _randomize_bn(Branchy(), g)
    x = torch.randn(2, 2, 5, 5, generator=g)
    assert batchnorm_pairs(model, x) == [("conv", "bn")]
    # negative control: without the skip the same layer folds
    model.forward = lambda inp: model.bn2(model.lin(model.bn(model.conv(inp)).mean((2, 3))))
    assert batchnorm_pairs(model, x) == [("conv", "bn"), ("lin", "bn2")]
