"""Reference models for 8x8 digits: MLP, VGG-style CNN, CIFAR-style ResNet-20 and a tiny ViT.

All models are plain ``nn.Module`` s in torch layout, written with ordinary ``torch`` /
``torch.nn.functional`` ops (no ``torch.jit``, no fused encoder layers, no in-place ops on
parameters) so that the symmetry tracer can follow their forward pass. Every constructor takes
``seed``: with a seed, initialisation draws from a forked global RNG seeded with it, so two models
built with one seed are identical and the caller's global RNG state is left untouched.

Every model has ``example_input(batch=2, seed=0)`` returning a correctly shaped float32 tensor;
:func:`example_inputs` does the same for any zoo model, and :func:`make` builds one by name.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["MLP", "VGG", "ResNet20", "TinyViT", "Activation", "make", "example_inputs", "MODELS"]

_ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "silu", "sine")


@contextlib.contextmanager
def _seeded(seed: Optional[int]) -> Iterator[None]:
    """Run the body with the global torch RNG seeded, restoring the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _example(shape: Tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((int(batch),) + tuple(shape), generator=g)


class Activation(nn.Module):
    """Element-wise nonlinearity as a module, so hooks can capture post-activation features.

    ``name`` is one of relu, gelu, tanh, sigmoid, silu, sine; sine computes ``sin(w0 * x)``
    (SIREN, Sitzmann et al. 2020, arXiv:2006.09661; ``w0 = 30`` there, 1 by default here).
    """

    def __init__(self, name: str = "relu", w0: float = 1.0) -> None:
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(_ACTIVATIONS)}")
        self.name = name
        self.w0 = float(w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "relu":
            return F.relu(x)
        if self.name == "gelu":
            return F.gelu(x)
        if self.name == "tanh":
            return torch.tanh(x)
        if self.name == "sigmoid":
            return torch.sigmoid(x)
        if self.name == "silu":
            return F.silu(x)
        return torch.sin(self.w0 * x)

    def extra_repr(self) -> str:
        return self.name + (f", w0={self.w0}" if self.name == "sine" else "")


class MLP(nn.Module):
    """Multilayer perceptron ``in -> hidden[0] -> ... -> hidden[-1] -> out``.

    Each hidden layer ``i`` is ``fc[i]`` (Linear) -> ``norms[i]`` (BatchNorm1d, LayerNorm or
    Identity) -> ``acts[i]`` (:class:`Activation`) -> ``drops[i]`` (Dropout or Identity);
    ``head`` is the output Linear. Inputs of shape (N, in_features), or any (N, ...) whose trailing
    dims multiply to ``in_features`` (e.g. (N, 1, 8, 8) digits), are flattened; output (N, out).

    Parameters
    ----------
    in_features, hidden, out_features : layer widths; ``hidden=()`` gives a linear model.
    activation : relu, gelu, tanh, sigmoid, silu or sine (``sin(w0 x)``); ``w0`` sets its frequency.
    bias : whether the Linear layers have biases.
    norm : None, "batch" or "layer" after each hidden Linear.
    dropout : dropout probability after each hidden activation.
    seed : optional initialisation seed (see module docstring).
    """

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (128, 128), out_features: int = 10,
                 activation: str = "relu", bias: bool = True, norm: Optional[str] = None,
                 dropout: float = 0.0, w0: float = 1.0, seed: Optional[int] = None) -> None:
        super().__init__()
        hidden = (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
        if int(in_features) < 1 or int(out_features) < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"layer widths must be >= 1, got in={in_features}, hidden={hidden}, out={out_features}")
        if norm not in (None, "none", "batch", "layer"):
            raise ValueError(f"norm must be None, 'batch' or 'layer', got {norm!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        Activation(activation)  # validates the name
        self.in_features, self.hidden, self.out_features = int(in_features), hidden, int(out_features)
        with _seeded(seed):
            widths = (self.in_features,) + hidden
            self.fc = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))
            self.norms = nn.ModuleList(
                nn.BatchNorm1d(h) if norm == "batch" else nn.LayerNorm(h) if norm == "layer" else nn.Identity()
                for h in hidden)
            self.acts = nn.ModuleList(Activation(activation, w0) for _ in hidden)
            self.drops = nn.ModuleList(nn.Dropout(dropout) if dropout > 0 else nn.Identity() for _ in hidden)
            self.head = nn.Linear(widths[-1], self.out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            x = torch.flatten(x, 1)
        for fc, norm, act, drop in zip(self.fc, self.norms, self.acts, self.drops):
            x = drop(act(norm(fc(x))))
        return self.head(x)

    def example_input(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """Random (batch, in_features) float32 input."""
        return _example((self.in_features,), batch, seed)


class VGG(nn.Module):
    """VGG-style CNN (Simonyan & Zisserman 2015, arXiv:1409.1556) sized for 8x8 digits.

    ``features`` is an ``nn.Sequential`` built from ``cfg``: an int ``c`` adds Conv2d(3x3, pad 1,
    ``c`` channels) [+ BatchNorm2d] + ReLU; ``"M"`` adds MaxPool2d(2). The ``classifier`` is then

    * ``head="flatten"``: flatten the (C, H, W) map C-major into ``C*H*W`` features (so a channel
      permutation P acts on the flattened axis as ``P kron I_{H*W}``, blocks of H*W entries), then
      optional hidden Linear+ReLU layers ``fc`` and a Linear to ``num_classes``;
    * ``head="gap"``: global average pooling to C features (channel permutations pass straight
      through), then the same Linear layers.

    Input (N, in_channels, image_size, image_size); output (N, num_classes). Convs have biases
    only without batch norm.
    """

    def __init__(self, cfg: Sequence[Union[int, str]] = (16, "M", 32, "M"), in_channels: int = 1,
                 num_classes: int = 10, batch_norm: bool = True, image_size: int = 8,
                 head: str = "flatten", fc: Sequence[int] = (), seed: Optional[int] = None) -> None:
        super().__init__()
        if head not in ("flatten", "gap"):
            raise ValueError(f"head must be 'flatten' or 'gap', got {head!r}")
        self.in_channels, self.image_size, self.head_kind = int(in_channels), int(image_size), head
        size, channels = self.image_size, self.in_channels
        layers = []
        with _seeded(seed):
            for item in cfg:
                if item == "M":
                    if size < 2:
                        raise ValueError(f"cfg {tuple(cfg)} pools a {size}x{size} map; remove an 'M' or raise "
                                         "image_size")
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                elif isinstance(item, int) and item > 0:
                    layers.append(nn.Conv2d(channels, item, 3, padding=1, bias=not batch_norm))
                    if batch_norm:
                        layers.append(nn.BatchNorm2d(item))
                    layers.append(nn.ReLU())
                    channels = item
                else:
                    raise ValueError(f"cfg entries must be positive ints or 'M', got {item!r}")
            self.features = nn.Sequential(*layers)
            width = channels * size * size if head == "flatten" else channels
            cls = []
            for h in fc:
                cls += [nn.Linear(width, int(h)), nn.ReLU()]
                width = int(h)
            cls.append(nn.Linear(width, int(num_classes)))
            self.classifier = nn.Sequential(*cls)
        self.feature_shape = (channels, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1) if self.head_kind == "flatten" else torch.mean(x, dim=(2, 3))
        return self.classifier(x)

    def example_input(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """Random (batch, in_channels, image_size, image_size) float32 input."""
        return _example((self.in_channels, self.image_size, self.image_size), batch, seed)


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        # LayerNorm over (C, H, W) with per-channel affine = GroupNorm with one group.
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """ResNet basic block: relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x)).

    ``shortcut`` is Identity when shape is kept, else ``Sequential(conv kxk stride s, norm)``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str, shortcut_kernel: int = 1) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm2d(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=bias)
        self.norm2 = _norm2d(norm, out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, shortcut_kernel, stride=stride, padding=shortcut_kernel // 2, bias=bias),
                _norm2d(norm, out_ch))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016, arXiv:1512.03385, Sec. 4.2) for 8x8 inputs.

    As used by Git Re-Basin (Ainsworth, Hayase & Srinivasa, ICLR 2023, arXiv:2209.04836):
    stem conv3x3 (16w) + norm + ReLU, then three stages ``layer1..3`` of three
    :class:`BasicBlock` s with 16w, 32w, 64w channels and strides 1, 2, 2 (8x8 -> 8 -> 4 -> 2),
    global average pooling and ``linear``. The first block of stages 2 and 3 has a projection
    shortcut (option B): a conv (``shortcut_kernel`` 1, or 3 as in Git Re-Basin) with stride 2
    plus a norm, never the zero-padding option A (which weight matching cannot handle).

    ``norm``: "batch" (BatchNorm2d), "layer" (``nn.GroupNorm(1, C)``: LayerNorm over (C, H, W)
    with per-channel affine, the LN variant of Git Re-Basin's PyTorch ports) or "none" (identity;
    convs then keep their biases). Input (N, in_channels, 8, 8); output (N, num_classes).
    """

    def __init__(self, width: int = 1, norm: str = "batch", num_classes: int = 10, in_channels: int = 1,
                 image_size: int = 8, shortcut_kernel: int = 1, seed: Optional[int] = None) -> None:
        super().__init__()
        if norm not in ("batch", "layer", "none"):
            raise ValueError(f"norm must be 'batch', 'layer' or 'none', got {norm!r}")
        if int(width) != width or int(width) < 1:
            raise ValueError(f"width must be a positive integer multiplier, got {width!r}")
        if shortcut_kernel not in (1, 3):
            raise ValueError(f"shortcut_kernel must be 1 or 3, got {shortcut_kernel!r}")
        self.width, self.norm_kind = int(width), norm
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        w = (16 * self.width, 32 * self.width, 64 * self.width)
        with _seeded(seed):
            self.conv1 = nn.Conv2d(self.in_channels, w[0], 3, padding=1, bias=norm == "none")
            self.norm1 = _norm2d(norm, w[0])
            stages, ch = [], w[0]
            for out_ch, stride in zip(w, (1, 2, 2)):
                blocks = []
                for i in range(3):
                    blocks.append(BasicBlock(ch, out_ch, stride if i == 0 else 1, norm, shortcut_kernel))
                    ch = out_ch
                stages.append(nn.Sequential(*blocks))
            self.layer1, self.layer2, self.layer3 = stages
            self.linear = nn.Linear(w[2], int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.mean(x, dim=(2, 3)))

    def example_input(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """Random (batch, in_channels, image_size, image_size) float32 input."""
        return _example((self.in_channels, self.image_size, self.image_size), batch, seed)


class ViTBlock(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)); x + fc2(gelu(fc1(norm2(x))))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al., ICLR 2021, arXiv:2010.11929) for 8x8 digits.

    ``patch_embed`` (Conv2d, kernel = stride = patch_size) turns (N, C, S, S) into
    P = (S/patch)^2 tokens of width ``dim``; a learnable ``cls_token`` (1, 1, dim) is prepended and
    a learnable ``pos_embed`` (1, P+1, dim) added; ``depth`` pre-LN :class:`ViTBlock` s
    (``nn.MultiheadAttention(batch_first=True)``, LayerNorm, GELU MLP of width dim*mlp_ratio),
    then the final ``norm`` and the ``head`` Linear on the CLS token. Output (N, num_classes).
    """

    def __init__(self, image_size: int = 8, patch_size: int = 2, in_channels: int = 1, dim: int = 32,
                 depth: int = 2, heads: int = 4, mlp_ratio: float = 2, num_classes: int = 10,
                 seed: Optional[int] = None) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be divisible by patch_size {patch_size}")
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.image_size, self.in_channels = int(image_size), int(in_channels)
        n_patches = (image_size // patch_size) ** 2
        with _seeded(seed):
            self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
            self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
            self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n_patches + 1, dim))
            self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio) for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)                      # (N, dim, S/p, S/p)
        x = torch.flatten(x, 2).transpose(1, 2)      # (N, P, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])

    def example_input(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """Random (batch, in_channels, image_size, image_size) float32 input."""
        return _example((self.in_channels, self.image_size, self.image_size), batch, seed)


MODELS: Dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "vgg": VGG, "resnet20": ResNet20, "vit": TinyViT}


def make(name: str, **kwargs) -> nn.Module:
    """Build a zoo model by name: "mlp", "vgg", "resnet20" or "vit" (keyword options pass through).

    >>> make("mlp", hidden=(32,), seed=0)(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
    """
    key = str(name).lower()
    if key not in MODELS:
        close = difflib.get_close_matches(key, MODELS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown zoo model {name!r}{hint}; choose one of {', '.join(MODELS)}")
    return MODELS[key](**kwargs)


def example_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A correctly shaped random input for ``model`` (any model with an ``example_input`` method).

    The tensor is on the device of the model's first parameter.
    """
    fn = getattr(model, "example_input", None)
    if not callable(fn):
        raise TypeError(f"{type(model).__name__} has no example_input(batch) method; build the input yourself")
    x = fn(batch=batch, seed=seed)
    p = next(iter(model.parameters()), None)
    return x if p is None else x.to(p.device)
