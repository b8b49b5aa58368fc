"""benchmarks/predictor.py: the fast NAS-Bench-201 layer costs equal layer_costs on built networks."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from slimsearch.hardware_profiles import layer_costs

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "predictor.py"
_spec = importlib.util.spec_from_file_location("predictor_benchmark", _PATH)
predictor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(predictor)

CELLS = [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
    "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|",
    "|skip_connect~0|+|nor_conv_3x3~0|skip_connect~1|+|skip_connect~0|none~1|none~2|",  # dead conv
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|none~0|none~1|none~2|",  # constant output
    "|nor_conv_1x1~0|+|none~0|none~1|+|none~0|none~1|nor_conv_3x3~2|",  # output: conv of a zero node
]


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("bits", [32, 16])
def test_assembled_costs_equal_layer_costs_of_the_built_network(fold, bits):
    costs = predictor.NB201Costs(bits, fold_constant=fold)
    x = torch.zeros(predictor.NB201_INPUT_SHAPE)
    for arch in CELLS:
        built = predictor.build_nb201(arch, fold_constant=fold)
        # sparsity is measured on the random weights of each build (a weight can be exactly 0)
        expected = [dataclasses.replace(c, sparsity=0.0) for c in layer_costs(predictor.set_bits(built, bits), x)]
        assert [dataclasses.replace(c, sparsity=0.0) for c in costs(arch)] == expected, arch


def test_the_built_network_runs_and_folding_drops_dead_and_constant_work():
    x = torch.randn(2, 3, 32, 32)
    assert predictor.build_nb201(CELLS[0]).eval()(x).shape == (2, 10)
    plain, folded = predictor.NB201Costs(32), predictor.NB201Costs(32, fold_constant=True)
    assert len(folded(CELLS[2])) < len(plain(CELLS[2]))
    assert predictor.output_is_constant(CELLS[3]) and predictor.output_is_constant(CELLS[4])
    assert not predictor.output_is_constant(CELLS[2])
    assert sum(l.macs for l in folded(CELLS[3])) < 100 < sum(l.macs for l in plain(CELLS[3]))
    # additions between edges are costed: CELLS[0] has 1 + 2 of them per cell, 15 cells
    adds = [l for l in plain(CELLS[0]) if ".add" in l.name and l.name.startswith("cells.")]
    assert len(adds) == 3 * 15 + 2  # and one in each of the two residual blocks
