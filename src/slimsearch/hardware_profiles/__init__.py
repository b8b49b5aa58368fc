"""Device profiles and what a model costs on them.

A profile is a data file (``profiles/<name>.yaml``) giving a device's peak throughput
per precision, memory bandwidth, accelerated sparsity patterns, power modes, energy
per MAC and per byte, price, efficiency factors and a source for every number.
:func:`predict` turns per-layer costs from :func:`layer_costs` into *modelled*
latency, energy and cost; :func:`measure_latency` times code on this machine (:func:`measure_paired` against a reference, in
alternating rounds);
:func:`calibrate` refits a profile's efficiency factors from measured latencies and learns
a :class:`Correction` of what the roofline still misses; :func:`measure_host` writes a
profile of this machine.

Importing this package does not import torch; the functions that need it do.
"""

from __future__ import annotations

from slimsearch.hardware_profiles._correction import Correction
from slimsearch.hardware_profiles._fit import FIT_PARAMETERS, calibrate
from slimsearch.hardware_profiles._fit_report import FitReport, fit_report, kendall_tau, report, share_within
from slimsearch.hardware_profiles._decode import DecoderFootprint, DecoderPrediction, predict_decoder
from slimsearch.hardware_profiles._enums import Bound, DeviceKind, OpType, Precision
from slimsearch.hardware_profiles._host import measure_host
from slimsearch.hardware_profiles._layers import LayerCost, layer_costs
from slimsearch.hardware_profiles._measure import PairedTiming, Timing, measure_latency, measure_paired
from slimsearch.hardware_profiles._measurements import load_measurements
from slimsearch.hardware_profiles._predict import (
    LayerPrediction,
    Prediction,
    predict,
    predict_model,
)
from slimsearch.hardware_profiles._catalogue import list_profiles, load_profile
from slimsearch.hardware_profiles._profile import HardwareProfile, PowerMode

__all__ = [
    "FIT_PARAMETERS",
    "Bound",
    "Correction",
    "DecoderFootprint",
    "DecoderPrediction",
    "DeviceKind",
    "FitReport",
    "HardwareProfile",
    "LayerCost",
    "LayerPrediction",
    "OpType",
    "PairedTiming",
    "PowerMode",
    "Precision",
    "Prediction",
    "Timing",
    "calibrate",
    "fit_report",
    "kendall_tau",
    "layer_costs",
    "list_profiles",
    "load_measurements",
    "load_profile",
    "measure_host",
    "measure_latency",
    "measure_paired",
    "predict",
    "predict_decoder",
    "predict_model",
    "report",
    "share_within",
]
