"""A user task: your own model, data and metric, as slimsearch runs them.

slimsearch imports this file because the job file next to it says
``task: tabular_task:breast_cancer`` (a job's ``module:function`` is looked up in
the job file's folder first). The function takes ``seed`` and returns a
``slimsearch.tasks.Task``; everything else here is ordinary PyTorch.

The data is scikit-learn's Wisconsin breast-cancer table (569 rows, 30 features,
shipped inside scikit-learn, nothing downloaded); the model is an MLP; the metric
is balanced accuracy (the mean of the per-class recalls), which the search
maximises instead of plain accuracy because the two classes are unequal (212/357).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.tasks import Preprocessing, Split, Task

N_VAL = 114
N_TEST = 114
EPOCHS = 60


def mlp(features: int, classes: int) -> nn.Sequential:
    """The teacher's architecture; plans name its layers (``fc1`` ... ``fc3``)."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(features, 256)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(256, 128)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(128, classes)),
    ]))


def balanced_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean recall over the classes present in ``labels`` (higher is better)."""
    predicted = logits.argmax(dim=1)
    recalls = [float((predicted[labels == c] == c).float().mean()) for c in labels.unique()]
    return sum(recalls) / len(recalls)


def _train(model: nn.Module, train: Split, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(train), generator=gen)
        for start in range(0, len(train), 32):
            idx = order[start : start + 32]
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def breast_cancer(seed: int = 0) -> Task:
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer()
    x = torch.tensor(table.data, dtype=torch.float32)
    y = torch.tensor(table.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, test, train = perm[:N_VAL], perm[N_VAL : N_VAL + N_TEST], perm[N_VAL + N_TEST :]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std  # per-feature standardisation with the training rows' statistics
    splits = [Split(x[idx], y[idx]) for idx in (train, val, test)]

    torch.manual_seed(seed)  # the initial weights too: the same teacher in the driver, every worker and at export
    teacher = mlp(x.shape[1], 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # and bit for bit, whatever thread count the caller runs with
    try:
        _train(teacher, splits[0], seed)
    finally:
        torch.set_num_threads(threads)
    weights = b"".join(t.numpy().tobytes() for t in teacher.state_dict().values())
    return Task(
        name="breast-cancer-mlp",
        teacher=teacher,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        metric=balanced_accuracy,
        metric_name="balanced_accuracy",
        example_input=splits[1].x[:1].clone(),
        preprocessing=Preprocessing(
            input_name="input", input_shape=(1, x.shape[1]), input_dtype="float32", scale=1.0, mean=0.0, std=1.0,
            layout=f"the 30 features of sklearn's load_breast_cancer, each standardised with the mean and std of "
                   f"the training rows (seed {seed})"),
        teacher_sha256=hashlib.sha256(weights).hexdigest(),
    )
