"""What a decoder LLM candidate costs: measured decode time here, modelled figures per profile.

A causal LM is costed per generated token, at batch 1, as it is used:

- ``size_bytes``: the deployed weights (:func:`~slimsearch.evaluators.llm_costs.weight_bytes`:
  packed codes and scales of quantized linears, float32 elsewhere); ``params``; ``macs`` per
  token (linears and output projection); ``bitops`` (each linear's MACs times its weight and
  input widths).
- ``latency_ms@P``, ``energy_mj@P``, ``cost_usd_per_1m@P`` for each profile P, all modelled by
  :func:`~slimsearch.hardware_profiles.predict_decoder`: decode ms per token at
  ``CONTEXT_TOKENS`` = 128 tokens of context, energy per token, dollars per million tokens.
- ``latency_ms@local``, measured: decode ms per token of the PyTorch model with its KV cache,
  batch 1, ``DECODE_TOKENS`` = 16 greedy tokens after a ``PROMPT_TOKENS`` = 32-token prompt
  (the median of ``REPEATS`` runs). The forward hooks that simulate quantized numerics
  (activations, KV cache) are off while it is timed: they are not what a deployment runs,
  and PyTorch runs every linear in float, so quantization does not speed this figure up
  (cuts do); the deployed speed of quantized linears is the ONNX Runtime GenAI timing of
  :mod:`slimsearch.deploy.llm_timing`. ``energy_mj@local`` (per token) where the machine
  has energy counters.
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

from slimsearch.evaluators.metrics import COST_METRICS, Metrics, Provenance
from slimsearch.metric_names import LOCAL_PROFILE

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimsearch.compress.llm_methods import DecoderRecord

CONTEXT_TOKENS = 128
PROMPT_TOKENS = 32
DECODE_TOKENS = 16
REPEATS = 3
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def hooks_off(model: "nn.Module") -> Iterator[None]:
    """Every module's forward hooks taken out while inside, put back after."""
    saved = []
    for module in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if hooks:
                saved.append((hooks, dict(hooks)))
                hooks.clear()
    try:
        yield
    finally:
        for hooks, items in saved:
            hooks.update(items)


def _cache_keyword(model: "nn.Module") -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers 5.x) or ``past_key_values`` (before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _decode(model: "nn.Module", cache: Any, first: "torch.Tensor", tokens: int, keyword: str) -> None:
    import torch

    token = first
    with torch.no_grad():
        for _ in range(tokens):
            out = model(input_ids=token, use_cache=True, **{keyword: cache})
            cache = _cache_of(out)
            token = out.logits[:, -1:].argmax(-1)


def measure_decoder(model: "nn.Module", task: Any, *, repeats: int = REPEATS, energy=None) -> dict[str, float]:
    """``latency_ms@local``: decode ms per token with the KV cache, batch 1 (see the module's text), and
    ``energy_mj@local`` per token when ``energy`` (an EnergyMeter) is given.

    Unpaired for now: a plain median, as loaded as the machine was, not timed in rounds with the
    teacher as the ONNX graphs of other tasks are in a job
    (:func:`~slimsearch.hardware_profiles.measure_paired`, :func:`~slimsearch.evaluators.candidate.measure_local`)."""
    import torch

    from slimsearch.hardware_profiles import measure_latency

    prompt = task.val.x[:1, :PROMPT_TOKENS]
    param = next(model.parameters())
    prompt = prompt.to(param.device)
    model.eval()
    keyword = _cache_keyword(model)
    with hooks_off(model), torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, first = _cache_of(out), out.logits[:, -1:].argmax(-1)

        def run() -> None:  # the prompt's cache, copied: each run decodes the same tokens
            _decode(model, copy.deepcopy(cache), first, DECODE_TOKENS, keyword)

        timing = measure_latency(run, warmup=1, repeats=repeats)
        values = {f"latency_ms@{LOCAL_PROFILE}": timing.median_ms / DECODE_TOKENS}
        if energy is not None:
            reading = energy.measure(run, warmup=0, repeats=repeats, min_time_s=0.5)
            values[f"energy_mj@{LOCAL_PROFILE}"] = reading.mj_per_call / DECODE_TOKENS
    return values


def decoder_costs(model: "nn.Module", profiles: Sequence[Any], power_modes: Optional[Mapping[str, str]] = None, *,
                  measured: Optional[Mapping[str, float]] = None,
                  record: Optional["DecoderRecord"] = None) -> Metrics:
    """The static costs of a decoder LLM and its modelled figures on each profile (see the module's
    text); ``measured`` figures (``@local``) are added as measured. ``record`` is what the LLM methods
    did to it (default: the model's own, :func:`~slimsearch.compress.llm_methods.record_of`)."""
    from slimsearch.compress.llm_methods import record_of
    from slimsearch.evaluators.llm_costs import decoder_footprint, weight_bytes
    from slimsearch.exceptions import ConfigError, UnsupportedOnDevice
    from slimsearch.hardware_profiles import load_profile, predict_decoder
    from slimsearch.structures import llm

    record = record or record_of(model)
    footprint = decoder_footprint(model, quantized=record.quantized, kv_bits=record.kv_bits,
                                  act_bits=record.act_bits, sparsity=record.sparsity)
    bitops = 0
    for path, module in llm.decoder_linears(model).items():
        n_in, n_out = llm.in_out(module)
        q = record.quantized.get(path)
        bitops += n_in * n_out * (q.bits if q is not None else 32) * (8 if path in record.act_paths else 32)
    vocab, hidden = model.get_input_embeddings().weight.shape
    bitops += vocab * hidden * 32 * 32
    values: dict[str, Optional[float]] = {
        "size_bytes": float(weight_bytes(model, quantized=record.quantized)),
        "params": float(sum(p.numel() for p in model.parameters())),
        "macs": float(footprint.macs),
        "bitops": float(bitops),
    }
    provenance: dict[str, Provenance] = {}
    for name, value in (measured or {}).items():
        values[name], provenance[name] = value, Provenance.MEASURED
    for ref in profiles:
        profile = load_profile(ref)
        try:
            try:  # a device without kernels wide enough for the model as it is has no figures
                profile.kernel_precision(min(max(footprint.weight_bits, footprint.act_bits), 32))
            except ConfigError as exc:
                raise UnsupportedOnDevice(str(exc)) from None
            pred = predict_decoder(profile, footprint, prompt_tokens=CONTEXT_TOKENS, context_tokens=CONTEXT_TOKENS,
                                   power_mode=(power_modes or {}).get(profile.name))
            figures = (pred.decode_ms_per_token, pred.energy_mj_per_token, pred.usd_per_1m_tokens)
        except UnsupportedOnDevice:
            figures = (None, None, None)
        for key, value in zip(COST_METRICS, figures):
            values[f"{key}@{profile.name}"] = value
            provenance[f"{key}@{profile.name}"] = Provenance.MODELLED
    return Metrics(values=values, provenance=provenance)
