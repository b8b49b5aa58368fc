"""evaluators/costs.py: a model's static costs and device figures, with their provenance."""

from __future__ import annotations

import torch
from torch import nn

from slimsearch.evaluators.costs import model_costs, modelled_costs, static_costs
from slimsearch.evaluators.metrics import Provenance
from slimsearch.hardware_profiles import layer_costs, predict

X = torch.zeros(1, 4)
JETSON = "jetson-orin-nano"


def _tiny() -> nn.Module:
    """4 -> 3 -> 2, float: 23 parameters, 18 MACs at batch 1."""
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_static_costs_are_exact():
    model = _tiny()
    assert static_costs(model, layer_costs(model, X)) == {
        "size_bytes": 92.0,  # 23 float32 parameters
        "params": 23.0,
        "macs": 18.0,  # 4 * 3 + 3 * 2
        "bitops": 18.0 * 32 * 32,
    }


def test_modelled_costs_are_predicts_at_the_named_power_mode_and_none_where_the_model_cannot_run():
    layers = layer_costs(_tiny(), X)
    costs = modelled_costs(layers, ["nvidia-t4", JETSON, "edge-tpu"], {JETSON: "7W"})
    t4, jetson = predict(layers, "nvidia-t4"), predict(layers, JETSON, power_mode="7W")
    assert costs.values == {
        "latency_ms@nvidia-t4": t4.latency_ms, "energy_mj@nvidia-t4": t4.energy_mj,
        "cost_usd_per_1m@nvidia-t4": t4.cost_usd_per_1m,
        f"latency_ms@{JETSON}": jetson.latency_ms, f"energy_mj@{JETSON}": jetson.energy_mj,
        f"cost_usd_per_1m@{JETSON}": None,  # not rented: no price
        # a float model has no kernels on the Edge TPU: no figures rather than a guess
        "latency_ms@edge-tpu": None, "energy_mj@edge-tpu": None, "cost_usd_per_1m@edge-tpu": None,
    }
    assert t4.cost_usd_per_1m is not None and jetson.energy_mj != predict(layers, JETSON).energy_mj
    assert costs.provenance == {name: Provenance.MODELLED for name in costs.values}


def test_model_costs_are_static_then_measured_then_modelled():
    model = _tiny()
    layers = layer_costs(model, X)
    costs = model_costs(model, X, [JETSON], {JETSON: "7W"}, measured={"latency_ms@local": 0.5})
    modelled = modelled_costs(layers, [JETSON], {JETSON: "7W"})
    assert list(costs.values.items()) == [*static_costs(model, layers).items(), ("latency_ms@local", 0.5),
                                          *modelled.values.items()]
    # static costs carry no provenance; every device figure does
    assert costs.provenance == {"latency_ms@local": Provenance.MEASURED, **modelled.provenance}


def test_a_timer_measures_its_profiles_latency_and_leaves_energy_and_cost_modelled():
    calls = []

    def timer(name: str, ms: int):
        return lambda: calls.append(name) or ms

    costs = model_costs(_tiny(), X, ["nvidia-t4"], timers={"nvidia-t4": timer("nvidia-t4", 3),
                                                          JETSON: timer(JETSON, 4)})
    assert calls == ["nvidia-t4"]  # a device that is not among the profiles is not timed
    assert costs["latency_ms@nvidia-t4"] == 3.0 and isinstance(costs["latency_ms@nvidia-t4"], float)
    assert costs.provenance == {"latency_ms@nvidia-t4": Provenance.MEASURED,
                                "energy_mj@nvidia-t4": Provenance.MODELLED,
                                "cost_usd_per_1m@nvidia-t4": Provenance.MODELLED}
    assert costs["energy_mj@nvidia-t4"] == predict(layer_costs(_tiny(), X), "nvidia-t4").energy_mj


def test_the_estimate_module_still_offers_the_cost_functions():
    from slimsearch.evaluators import costs, estimate

    assert estimate.static_costs is costs.static_costs
    assert estimate.modelled_costs is costs.modelled_costs

