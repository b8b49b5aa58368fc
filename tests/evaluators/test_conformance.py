"""The conformance suite every built-in task and compression step passes.

One plan that uses every step (width pruning of every group, depth where the model
has droppable blocks, low-bit weights, 8-bit activations, sparsity, distillation)
is applied to each built-in task's teacher, and the result must keep the promises
DESIGN.md makes: deterministic for the seed, fewer parameters and packed bytes,
unchanged output shape, and it still runs at batch size 1.
"""

from __future__ import annotations

import pytest
import torch

from slimsearch.compress import apply_plan
from slimsearch.deploy.pack import packed_size
from slimsearch.structures.channels import ChannelStructure
from slimsearch.tasks import layer_names
from slimsearch.spaces import CompressionPlan, DistillPlan, LayerPlan
from slimsearch.metric_names import TaskFamily
from slimsearch.tasks import BUILTIN_TASKS, load_task
from slimsearch.tasks._registry import task_family

# mnist-resnet and minilm train or load real teachers (a minute or two each on 2 cores, once per run).
# mnist shares its architecture with digits, so digits stands for it here. The causal-lm tasks
# (smollm2) are compressed by their own methods, with plans keyed by linear group: their suite is
# tests/compress/test_llm_methods.py on tiny models, and the slow tests/evaluators/test_decoder.py.
TASKS = [name for name in BUILTIN_TASKS if name != "mnist" and task_family(name) is TaskFamily.CLASSIFICATION]


# the ResNet teacher trains for a minute and MiniLM loads in half of one: the full suite; digits stays in the fast tier
@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow) if name in ("mnist-resnet", "minilm")
                                        else name for name in TASKS])
def task(request, teacher_cache):
    return load_task(request.param)


def _plan(task, *, seed: int = 3) -> CompressionPlan:
    structure = task.structure or ChannelStructure()
    groups = structure.groups(task.teacher, task.example_input)
    droppable = structure.droppable(task.teacher)
    layers = {name: LayerPlan(weight_bits=4, act_bits=8, sparsity=0.25) for name in layer_names(task.teacher)}
    for group in groups:
        base = layers.get(group, LayerPlan(weight_bits=4, act_bits=8, sparsity=0.25))
        layers[group] = LayerPlan(prune_ratio=0.5, weight_bits=base.weight_bits, act_bits=base.act_bits,
                                  sparsity=base.sparsity)
    return CompressionPlan(layers=layers, distill=DistillPlan(steps=3, batch_size=8), seed=seed,
                           drop=tuple(droppable[-1:]))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_a_plan_gives_the_same_model_for_the_same_seed(task):
    plan = _plan(task)
    first, second = apply_plan(task, plan), apply_plan(task, plan)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_parameters_and_packed_bytes_drop_and_shapes_hold(task):
    model = apply_plan(task, _plan(task))
    # strictly fewer: how much fewer depends on the model (MiniLM's float word
    # embeddings are half of its bytes and are neither pruned nor quantized)
    assert _params(model) < _params(task.teacher)
    assert packed_size(model) < packed_size(task.teacher)
    x = task.val.x[:4]
    with torch.no_grad():
        assert model(x).shape == task.teacher(x).shape
        assert model(task.example_input).shape == task.teacher(task.example_input).shape
