"""The choice table is the one place a searchable choice is declared: the plan, the job file's
schema and the search space follow it, and the job-file reference documents every entry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from slimsearch.exceptions import ConfigError
from slimsearch.spaces.choices import CHOICES, Scope, choice, layer_fields
from slimsearch.spaces.plan import CompressionPlan, DistillPlan, LayerPlan
from slimsearch.spaces.schema import LayerChoices, SpaceSpec

DOC = Path(__file__).resolve().parents[2] / "docs" / "job-file.md"


def test_every_layer_choice_is_a_layer_plan_field_with_its_default():
    fields = {f.name: f.default for f in dataclasses.fields(LayerPlan)}
    assert fields == {c.name: c.default for c in layer_fields()}


def test_every_choice_is_in_the_job_schema_with_its_default_and_per_layer_ones_in_overrides():
    spec = SpaceSpec()
    for c in CHOICES:
        assert getattr(spec, c.name) == list(c.space_default)
    assert set(LayerChoices.model_fields) == {c.name for c in CHOICES if c.per_layer}


def test_plan_and_distill_choices_set_their_fields():
    plan_fields = {f.name for f in dataclasses.fields(CompressionPlan)}
    distill_fields = {f.name for f in dataclasses.fields(DistillPlan)}
    for c in CHOICES:
        if c.scope is Scope.PLAN:
            assert c.field in plan_fields
        if c.scope is Scope.DISTILL:
            assert c.field in distill_fields and getattr(DistillPlan(), c.field) == c.default


@pytest.mark.parametrize("c", CHOICES, ids=lambda c: c.name)
def test_each_choice_allows_its_defaults_and_refuses_a_wrong_type(c):
    assert c.allows(c.default) and all(c.allows(v) for v in c.space_default)
    wrong = "x" if c.kind is not str else 3
    with pytest.raises(ConfigError, match=f"^{c.name}: .* is not allowed; allowed: "):
        c.check(wrong)


def test_the_job_file_reference_lists_every_choice():
    text = DOC.read_text(encoding="utf-8")
    missing = [c.name for c in CHOICES if f"| `{c.name}` |" not in text]
    assert not missing, f"docs/job-file.md's space table lacks {missing}"


def test_an_unknown_choice_name_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown choice 'bits'; allowed: .*'weight_bits'"):
        choice("bits")
