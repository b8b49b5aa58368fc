"""The graph kinds a classification candidate deploys as, and the teacher built as each (the reference
its local latency is paired with)."""

from __future__ import annotations

import onnx
import pytest

from slimsearch.compress import apply_plan
from slimsearch.deploy.onnx_int8 import deployable_onnx_bytes
from slimsearch.evaluators.graph_kinds import (ACT_QDQ, FLOAT, GRAPH_KINDS, W8A8, graph_kind, kind_figures, kind_key,
                                               kind_reference, kinds_in)
from slimsearch.exceptions import ConfigError
from slimsearch.spaces.plan import CompressionPlan, LayerPlan


def _ops(model, task) -> set[str]:
    return {n.op_type for n in onnx.load_from_string(deployable_onnx_bytes(model, task.example_input)).graph.node}


def test_each_kinds_reference_deploys_as_that_kind_and_a_candidate_is_classified_by_its_graph(digits_task):
    assert graph_kind(digits_task.teacher) == FLOAT
    for kind in GRAPH_KINDS:
        assert graph_kind(kind_reference(digits_task, kind)) == kind
    assert kind_reference(digits_task, FLOAT) is digits_task.teacher
    assert "QuantizeLinear" not in _ops(digits_task.teacher, digits_task)
    assert "QuantizeLinear" in _ops(kind_reference(digits_task, ACT_QDQ), digits_task)
    names = digits_task.plan_layers()
    four_bit = apply_plan(digits_task, CompressionPlan(layers={n: LayerPlan(weight_bits=4) for n in names}))
    assert graph_kind(four_bit) == FLOAT  # weights stored de-quantized: a float graph
    one_input = apply_plan(digits_task, CompressionPlan(layers={names[0]: LayerPlan(weight_bits=4, act_bits=8)}))
    assert graph_kind(one_input) == ACT_QDQ
    with pytest.raises(ConfigError, match="graph kind must be one of"):
        kind_reference(digits_task, "int4")


def test_a_space_has_the_quantized_input_kinds_only_where_some_act_bits_is_below_32():
    assert kinds_in([("weight_bits.fc1", (4, 8, 32)), ("act_bits.fc1", (32,))]) == (FLOAT,)
    assert kinds_in([("weight_bits.fc1", (4, 8, 32)), ("act_bits.fc1", (8, 32))]) == (FLOAT, ACT_QDQ, W8A8)
    assert kinds_in([("weight_bits.fc1", (4, 32)), ("act_bits.fc1", (8, 32))]) == (FLOAT, ACT_QDQ)  # never W8A8
    assert kinds_in([("act_bits.fc1", (8, 32))]) == (FLOAT, ACT_QDQ)  # weights float: never W8A8


def test_kind_figures_are_keyed_beside_the_teachers_and_split_back():
    figures = {kind_key(FLOAT, "latency_ms@local"): 2.0, kind_key(W8A8, "latency_ms@local"): 1.0}
    assert figures == {"latency_ms@local": 2.0, "w8a8:latency_ms@local": 1.0}
    assert kind_figures(figures) == {FLOAT: {"latency_ms@local": 2.0}, W8A8: {"latency_ms@local": 1.0}}
    with pytest.raises(ConfigError, match="names graph kind 'int4'; allowed"):
        kind_figures({"int4:latency_ms@local": 1.0})
