"""What a model costs: its static costs and its modelled device figures, each tagged with its provenance.

The one place that turns a model (and its :func:`~slimsearch.hardware_profiles.layer_costs`)
into cost metrics. :func:`~slimsearch.evaluators.estimate.estimate` (before training),
:func:`~slimsearch.evaluators.candidate.model_metrics` (after it) and a job's early stopping
(part way through) all cost a model here, so the three cannot drift apart.

A causal LM is costed per generated token instead (:func:`task_costs` picks by the task's
family; :mod:`slimsearch.evaluators.decoder` says how). Static costs (``size_bytes``,
``params``, ``macs``, ``bitops``) are exact and carry no provenance. Device figures (``latency_ms@P``, ``energy_mj@P``, ``cost_usd_per_1m@P``) are
modelled from profile ``P``, unless a figure timed on real hardware is given in their place:
that one is tagged measured.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from slimsearch.evaluators.metrics import COST_METRICS, Metrics, Provenance


def static_costs(model, layers) -> dict[str, float]:
    """``size_bytes`` (packed), ``params``, ``macs`` and ``bitops`` of ``model`` with ``layer_costs`` ``layers``."""
    from slimsearch.deploy.pack import packed_size

    return {
        "size_bytes": float(packed_size(model)),
        "params": float(sum(p.numel() for p in model.parameters())),
        "macs": float(sum(layer.macs for layer in layers)),
        "bitops": float(sum(layer.macs * layer.weight_bits * layer.act_bits for layer in layers)),
    }


def modelled_costs(layers, profiles: Sequence[Any], power_modes: Mapping[str, str] | None = None) -> Metrics:
    """``latency_ms@P``, ``energy_mj@P`` and ``cost_usd_per_1m@P`` of a model's ``layers`` on every
    profile ``P`` (anything :func:`~slimsearch.hardware_profiles.load_profile` takes), at the
    power mode ``power_modes`` names for it (its default otherwise), all modelled. A model that
    does not run on a device as it is gets ``None`` figures there rather than a guess.
    """
    from slimsearch.exceptions import UnsupportedOnDevice
    from slimsearch.hardware_profiles import load_profile, predict

    values: dict[str, float | None] = {}
    provenance: dict[str, Provenance] = {}
    for ref in profiles:
        profile = load_profile(ref)
        name = profile.name
        try:
            pred = predict(layers, profile, power_mode=(power_modes or {}).get(name))
            figures = (pred.latency_ms, pred.energy_mj, pred.cost_usd_per_1m)
        except UnsupportedOnDevice:
            figures = (None, None, None)
        for key, value in zip(COST_METRICS, figures):
            values[f"{key}@{name}"] = value
            provenance[f"{key}@{name}"] = Provenance.MODELLED
    return Metrics(values=values, provenance=provenance)


def model_costs(model, example_input, profiles: Sequence[Any], power_modes: Mapping[str, str] | None = None, *,
                measured: Mapping[str, float] | None = None,
                timers: Mapping[str, Callable[[], float]] | None = None) -> Metrics:
    """The static costs of ``model`` (run on ``example_input`` to cost its layers), then any
    ``measured`` figures, then its device figures on every profile of ``profiles`` at ``power_modes``
    (see :func:`modelled_costs`).

    ``measured`` are figures timed here (:func:`~slimsearch.evaluators.candidate.measure_local`'s
    ``@local`` ones), tagged measured. ``timers`` maps a profile name to a function that times
    the model on that very device and returns its batch-1 median in ms: that profile's
    ``latency_ms`` is then measured (its energy and cost stay modelled). A timer for a
    profile not among ``profiles`` is not called.
    """
    from slimsearch.hardware_profiles import layer_costs

    layers = layer_costs(model, example_input)
    values: dict[str, float | None] = dict(static_costs(model, layers))
    provenance: dict[str, Provenance] = {}
    for name, value in (measured or {}).items():
        values[name] = value
        provenance[name] = Provenance.MEASURED
    modelled = modelled_costs(layers, profiles, power_modes)
    values.update(modelled.values)
    provenance.update(modelled.provenance)
    for name, time in (timers or {}).items():
        if f"latency_ms@{name}" in values:
            values[f"latency_ms@{name}"] = float(time())
            provenance[f"latency_ms@{name}"] = Provenance.MEASURED
    return Metrics(values=values, provenance=provenance)


def task_costs(model, task, profiles: Sequence[Any], power_modes: Mapping[str, str] | None = None, *,
               measured: Mapping[str, float] | None = None,
               timers: Mapping[str, Callable[[], float]] | None = None, record=None) -> Metrics:
    """The costs of ``model``, a candidate of ``task``, as its family counts them: per inference by
    its layers (:func:`model_costs`), or per generated token for a causal LM
    (:func:`~slimsearch.evaluators.decoder.decoder_costs`, which takes ``record``, what the LLM
    methods did to it; ``timers`` on device nodes time ONNX graphs and are refused for it)."""
    from slimsearch.metric_names import TaskFamily

    if task.family is TaskFamily.CAUSAL_LM:
        if timers:
            from slimsearch.exceptions import ConfigError

            raise ConfigError(f"profiles {sorted(timers)}: timing a causal LM on device nodes is not supported; "
                              "its device figures are modelled (run the job without device nodes)")
        from slimsearch.evaluators.decoder import decoder_costs

        return decoder_costs(model, profiles, power_modes, measured=measured, record=record)
    return model_costs(model, task.example_input, profiles, power_modes, measured=measured, timers=timers)
