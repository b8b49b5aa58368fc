"""No tensor is stranded on a fixed device beside a model that may be elsewhere (issue 22).

Two checks, the stronger first:

1. **Run on the meta device** (the stronger one, where it works): the compression steps that
   rebuild layers or make tensors beside a model's weights (quantized twins and their buffers,
   low-rank factors, sparsity masks, channel pruning with its scores and kept indices,
   BatchNorm folding, a whole plan of prune + quantize + low rank + sparsity + fold + freeze through
   ``apply_plan`` on the digits task placed on meta with ``task_on``) run with every weight and
   input on ``meta``. Activation fake-quantization has no meta kernel in torch, so layers that
   quantize their inputs are checked for placement but run only with float inputs. A tensor made on the CPU that meets one of them raises a device mismatch,
   and every parameter and buffer of the result must be on meta. Steps that read values
   (calibration's ranges, distillation's finite-loss check, freezing's integer codes) cannot run
   on meta, which has no values; they are covered by check 2 and by their source.
2. **Inspect the source** (AST): in evaluators/, compress/, deploy/, structures/ and tasks/,
   every ``.numpy()`` is called on a ``.cpu()`` (``x.detach().cpu().numpy()``), so that none
   reads a tensor that may be on a GPU.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

SRC = Path(__file__).resolve().parents[1] / "src" / "slimsearch"
FOLDERS = ("evaluators", "compress", "deploy", "structures", "tasks")
META = torch.device("meta")


def _on_meta(model: nn.Module) -> None:
    stranded = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.device != META]
    assert not stranded, f"left off the meta device: {stranded}"


def _numpy_without_cpu(path: Path) -> list[int]:
    """Lines of ``path`` where ``.numpy()`` is called on something that is not ``<...>.cpu()``
    (``.contiguous()`` between them allowed)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy"):
            continue
        receiver = node.func.value
        while (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Attribute)
               and receiver.func.attr == "contiguous"):
            receiver = receiver.func.value
        if not (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Attribute)
                and receiver.func.attr == "cpu"):
            bad.append(node.lineno)
    return bad


def test_every_numpy_call_reads_a_cpu_tensor():
    found = {str(p.relative_to(SRC)): lines for folder in FOLDERS for p in sorted((SRC / folder).rglob("*.py"))
             if (lines := _numpy_without_cpu(p))}
    assert found == {}, "call .cpu() before .numpy() (x.detach().cpu().numpy()): the tensor may be on a GPU"


def test_the_inspection_catches_a_bare_numpy_call(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("a = x.numpy()\nb = x.detach().cpu().numpy()\nc = x.cpu().contiguous().numpy()\n"
                      "d = x.cuda().numpy()\n")
    assert _numpy_without_cpu(source) == [1, 4]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _meta_net() -> nn.Module:
    return _Net().eval().to(META)


@pytest.mark.parametrize("weight_bits, act_bits, group_size", [(8, 8, 0), (4, 32, 0), (4, 8, 4)])
def test_quantized_twins_and_their_buffers_stay_beside_the_weights(weight_bits, act_bits, group_size):
    from slimsearch.compress.quant.layers import quantized_twin

    for layer in (nn.Linear(16, 4), nn.Conv2d(8, 4, 3)):
        twin = quantized_twin(layer.to(META), weight_bits, act_bits, group_size=group_size)
        _on_meta(twin)
        if act_bits == 32:  # torch's fake_quantize_per_tensor_affine has no meta kernel: weights only run there
            x = torch.zeros(2, 16, device=META) if isinstance(layer, nn.Linear) else torch.zeros(2, 8, 5, 5, device=META)
            assert twin(x).device == META


def test_quantize_and_sparsify_a_model_on_meta():
    from slimsearch.compress.quantize import LayerQuant, QuantizeConfig, quantize
    from slimsearch.compress.quant.layers import quant_layers

    with_acts = quantize(_meta_net(), QuantizeConfig({"conv2": LayerQuant(4, 8), "fc": LayerQuant(8, 8)}))
    _on_meta(with_acts)
    model = quantize(_meta_net(), QuantizeConfig({"conv2": LayerQuant(4, 32, group_size=4), "fc": LayerQuant(8)}))
    for layer in quant_layers(model):
        layer.set_sparsity(0.5, "2:4" if layer is model.fc else None)
    _on_meta(model)
    assert model(torch.zeros(2, 1, 6, 6, device=META)).device == META  # weights fake-quantized and masked there


@pytest.mark.parametrize("layer", [nn.Linear(16, 12), nn.Conv2d(8, 12, 1)])
def test_low_rank_factors_are_made_where_the_layer_is(layer):
    from slimsearch.compress.lowrank import low_rank

    _on_meta(low_rank(layer.to(META), 0.5))


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_channel_pruning_scores_and_slices_on_the_weights_device(importance):
    from slimsearch.structures.channels import prune_channels

    pruned = prune_channels(_meta_net(), torch.zeros(1, 1, 6, 6, device=META), {"conv1": 0.5, "conv2": 0.25},
                            importance=importance)
    _on_meta(pruned)
    assert (pruned.conv1.out_channels, pruned.conv2.in_channels, pruned.fc.in_features) == (4, 4, 6)


def test_batchnorm_folds_into_a_bias_free_conv_on_the_weights_device():
    from slimsearch.structures.channels import fold_batchnorm

    model = _Net()
    model.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
    folded = fold_batchnorm(model.eval().to(META), torch.zeros(1, 1, 6, 6, device=META))
    _on_meta(folded)
    assert folded.conv1.bias is not None


def test_a_whole_plan_on_the_digits_task_placed_on_meta(digits_task):
    from slimsearch.compress import apply_plan
    from slimsearch.compress.registry import methods
    from slimsearch.spaces import CompressionPlan, LayerPlan
    from slimsearch.tasks import task_on

    plan = CompressionPlan(layers={"conv2": LayerPlan(prune_ratio=0.5, weight_bits=4, sparsity=0.5),
                                   "fc1": LayerPlan(prune_ratio=0.25, weight_bits=8, rank_ratio=0.5)},
                           seed=1)
    steps = [m.name for m in methods() if m.from_plan(plan) is not None]
    assert {"prune", "quantize", "sparsity", "lowrank"} <= set(steps)
    task = task_on(digits_task, META)
    assert task.teacher is not digits_task.teacher and task.val.x.device == META
    assert task_on(task, "cpu") is digits_task  # back home: the task itself, not another copy
    model = apply_plan(task, plan)
    _on_meta(model)
    assert model(task.example_input).device == META
