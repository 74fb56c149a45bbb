"""Small architectures (one per spec feature) shared by the weightspace.nn tests."""

import functools

import torch
import torch.nn as nn

import weightspace as ws
from weightspace import nn as wsnn
from weightspace import zoo


class TinyRes(nn.Module):
    """conv stem + two residual blocks with BatchNorm + GAP + linear: residual groups and norms."""

    def __init__(self, c=3, hidden=2):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(
                nn.Sequential(
                    nn.Conv2d(c, hidden, 3, padding=1, bias=False),
                    nn.BatchNorm2d(hidden),
                    nn.ReLU(),
                    nn.Conv2d(hidden, c, 1, bias=False),
                    nn.BatchNorm2d(c),
                )
            )
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = torch.relu(x + b(x))
        return self.head(x.mean(dim=(2, 3)))


def make(name, seed=0):
    torch.manual_seed(seed)
    if name == "mlp":
        return zoo.MLP(4, (5, 3), 2, seed=seed), torch.randn(2, 4)
    if name == "cnn":  # conv + BN + flatten (channels x ~H*W) into a Linear
        m = zoo.VGG(cfg=(3, "M", 2), image_size=4, num_classes=3, seed=seed)
        return m, zoo.example_inputs(m)
    if name == "resnet":
        return TinyRes(), torch.randn(2, 1, 4, 4)
    if name == "vit":  # attention with (heads x head_dim) axes, packed q|k|v, LayerNorm
        m = zoo.TinyViT(image_size=4, patch_size=2, dim=4, depth=1, heads=2, mlp_ratio=1, num_classes=3, seed=seed)
        return m, zoo.example_inputs(m)
    raise KeyError(name)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for n, b in model.named_buffers() if b.is_floating_point()]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if t.dim() == 1 else 0.0) * 0.1)
    return model


@functools.lru_cache(maxsize=None)
def batch_of(name, n=3, dtype=torch.float64):
    """(batch, spec, state dicts) of ``n`` random networks (cached: callers must not modify them)."""
    model, x = make(name)
    spec = ws.permutation_spec(model, x)
    sds = [randomize(make(name, seed=i)[0], 100 + i).state_dict() for i in range(n)]
    return wsnn.WeightSpaceBatch.from_state_dicts(sds, spec, dtype=dtype), spec, sds


def move_one(batch, key, perms):
    """Negative control: permute one tensor by ``perms`` without its coupled partners."""
    one = wsnn.WeightSpaceBatch(batch.spec, {key: batch.tensors[key]}).permute(perms)
    t = dict(batch.tensors)
    t[key] = one.tensors[key]
    return batch.with_tensors(t)


def permuted_key(spec, keys):
    """A processed key with a permuted axis, whose group also acts on some other processed key."""
    p2a = spec.perm_to_axes
    for k in keys:
        for lay in spec.axes[k]:
            if lay is None:
                continue
            for g, _ in lay.groups():
                if any(kk != k and kk in keys for kk, _, _ in p2a[g]):
                    return k
    raise AssertionError("no coupled key")
