"""Embedded data: scikit-learn's bundled 8x8 digits with a fixed split and task splits.

``sklearn.datasets.load_digits`` ships 1,797 8x8 grey-level images (values 0..16) of the digits
0-9 (the UCI optical-recognition test set, Alpaydin & Kaynak 1998) inside scikit-learn, so no
download is needed. This module gives it a **fixed, stratified train/test split** (1,200/597 by
default, seeded), standardisation computed **on the train split only** (over all ten classes, so
models trained on different task splits see the same input scaling), float32 tensors as flat
(N, 64) rows or (N, 1, 8, 8) images, and task splits (``"0-4"``, ``"5-9"`` or any tuple of
classes) whose labels keep the original digit values.

Two calls with the same arguments return identical (freshly allocated) tensors.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger(__name__)

__all__ = ["load_digits", "digits_loaders", "parse_classes", "TASKS", "N_TEST", "N_DIGITS"]

N_DIGITS = 1797
N_TEST = 597
TASKS = {"0-4": (0, 1, 2, 3, 4), "5-9": (5, 6, 7, 8, 9), "all": tuple(range(10)),
         "even": (0, 2, 4, 6, 8), "odd": (1, 3, 5, 7, 9)}

ClassSpec = Union[None, str, int, Sequence[int]]


def parse_classes(classes: ClassSpec) -> Optional[Tuple[int, ...]]:
    """Normalise a task spec: None (all), a name in ``TASKS``, a range "a-b", an int or a sequence."""
    if classes is None:
        return None
    if isinstance(classes, str):
        key = classes.strip()
        if key in TASKS:
            return TASKS[key]
        parts = key.split("-")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            lo, hi = int(parts[0]), int(parts[1])
            out = tuple(range(lo, hi + 1))
        else:
            raise ValueError(f"unknown task {classes!r}; use one of {', '.join(TASKS)}, a range like '0-4' "
                             "or a tuple of digits")
    elif isinstance(classes, (int, np.integer)):
        out = (int(classes),)
    else:
        out = tuple(int(c) for c in classes)
    if not out:
        raise ValueError("classes is empty; pass None for all ten digits")
    bad = [c for c in out if not 0 <= c <= 9]
    if bad:
        raise ValueError(f"classes {bad} are out of range: digits are 0..9")
    return tuple(sorted(set(out)))


@functools.lru_cache(maxsize=8)
def _split(seed: int, n_test: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_load_digits()
    X = bunch.data.astype(np.float64)  # (1797, 64), values 0..16
    y = bunch.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=n_test, random_state=seed, stratify=y)
    idx_tr, idx_te = np.sort(idx_tr), np.sort(idx_te)
    out = (X[idx_tr], y[idx_tr], X[idx_te], y[idx_te])
    for a in out:
        a.setflags(write=False)  # cached: callers get fresh tensors, the cache stays read-only
    return out


def load_digits(split: str = "train", flat: bool = True, classes: ClassSpec = None,
                standardize: Union[bool, str] = True, seed: int = 0,
                n_test: int = N_TEST) -> Tuple[torch.Tensor, torch.Tensor]:
    """The digits split as tensors ``(X, Y)``.

    Parameters
    ----------
    split : "train" (1,200 images by default), "test" (597) or "all" (train then test).
    flat : ``X`` of shape (N, 64) if True, else (N, 1, 8, 8); float32.
    classes : None (all ten), "0-4", "5-9", "even", "odd", a range "a-b", an int or a tuple of
        digits. Rows of other classes are dropped; labels ``Y`` (int64) keep the digit values.
    standardize : True / "global": ``(x - m) / s`` with one mean and std over all train pixels;
        "pixel": per-pixel mean and std of the train split (std floored at 1 grey level, since
        border pixels are nearly constant); False: raw grey levels 0..16.
        Statistics always come from the full train split of this ``seed`` (all classes).
    seed, n_test : the stratified ``train_test_split`` seed and test size (fixed defaults 0, 597).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 10 <= int(n_test) <= N_DIGITS - 10:
        raise ValueError(f"n_test must be in [10, {N_DIGITS - 10}], got {n_test}")
    Xtr, ytr, Xte, yte = _split(int(seed), int(n_test))
    if split == "train":
        X, y = Xtr, ytr
    elif split == "test":
        X, y = Xte, yte
    else:
        X, y = np.concatenate([Xtr, Xte]), np.concatenate([ytr, yte])
    if standardize in (True, "global"):
        X = (X - Xtr.mean()) / Xtr.std()
    elif standardize == "pixel":
        X = (X - Xtr.mean(axis=0)) / np.maximum(Xtr.std(axis=0), 1.0)
    elif standardize not in (False, None, "none"):
        raise ValueError(f"standardize must be True, 'global', 'pixel' or False, got {standardize!r}")
    keep = parse_classes(classes)
    if keep is not None:
        mask = np.isin(y, keep)
        X, y = X[mask], y[mask]
    Xt = torch.tensor(X, dtype=torch.float32)
    if not flat:
        Xt = Xt.reshape(-1, 1, 8, 8)
    return Xt, torch.tensor(y, dtype=torch.int64)


def digits_loaders(batch_size: int = 64, flat: bool = True, classes: ClassSpec = None, seed: int = 0,
                   standardize: Union[bool, str] = True, shuffle: bool = True, drop_last: bool = False,
                   split_seed: int = 0, test_batch_size: Optional[int] = None) -> Tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over :func:`load_digits`.

    The train loader shuffles with a ``torch.Generator`` seeded by ``seed`` (the global RNG is not
    used, not even for the iterators' base seeds), so iterating two loaders built with one seed gives identical
    batches; the test loader
    never shuffles. ``split_seed`` is the train/test split seed (see :func:`load_digits`).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kw = dict(flat=flat, classes=classes, standardize=standardize, seed=split_seed)
    tr = TensorDataset(*load_digits("train", **kw))
    te = TensorDataset(*load_digits("test", **kw))
    g = torch.Generator().manual_seed(int(seed))
    train_loader = DataLoader(tr, batch_size=int(batch_size), shuffle=shuffle, generator=g, drop_last=drop_last)
    # the test loader gets a generator too: DataLoader iterators draw a base seed from it, which
    # would otherwise come from (and advance) the global RNG
    test_loader = DataLoader(te, batch_size=int(test_batch_size or max(int(batch_size), 256)), shuffle=False,
                             generator=torch.Generator().manual_seed(int(seed)))
    return train_loader, test_loader
