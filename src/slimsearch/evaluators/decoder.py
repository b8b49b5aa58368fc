"""What a decoder LLM candidate costs: measured decode time here, modelled figures per profile.

A causal LM is costed per generated token, at batch 1, as it is used:

- ``size_bytes``: the deployed weights (:func:`~slimsearch.evaluators.llm_costs.weight_bytes`:
  packed codes and scales of quantized linears and of a rounded output projection, float32
  elsewhere); ``params``; ``macs`` per token (linears and output projection); ``bitops`` (each
  linear's MACs times its weight and input widths).
- ``latency_ms@P``, ``energy_mj@P``, ``cost_usd_per_1m@P`` for each profile P, all modelled by
  :func:`~slimsearch.hardware_profiles.predict_decoder`: decode ms per token at
  ``CONTEXT_TOKENS`` = 128 tokens of context, energy per token, dollars per million tokens.
- ``memory_bytes``: what serving it holds at ``MEMORY_CONTEXT`` = 2,048 tokens of context:
  ``size_bytes`` plus the KV cache at the model's KV precision (float32 when not quantized:
  what the deployed graph keeps).
- ``decode_tok_s@P``: modelled decode tokens per second on each profile (1000 / ``latency_ms@P``).
- Measured here, on the graph the candidate deploys as
  (:func:`~slimsearch.deploy.llm_graph.deployed_graph`: onnxruntime-genai's KV-cache graph,
  quantized linears as MatMulNBits or integer MatMuls), in a fresh process, batch 1, the
  worker's thread count (:func:`~slimsearch.deploy.llm_timing.time_generation`):
  ``latency_ms@local`` decode ms per token and ``decode_tok_s@local`` tokens per second over
  ``DECODE_TOKENS`` = 16 greedy tokens after a ``PROMPT_TOKENS`` = 32-token prompt, and
  ``prefill_ms@local`` for that prompt (medians of ``REPEATS`` runs after one warm-up). In a job
  (:class:`DecoderReference`), the graph is timed in rounds alternating with the teacher's deployed
  graph in the same process, and each figure is the median per-round ratio to the teacher's times
  the teacher's figure taken at the job's start, before Ray and its workers ran: a machine busy
  with the search's own processes slows both alike. A model
  whose architecture the builder does not support (GPT-2) is timed in PyTorch instead, with its
  KV cache and every linear in float (quantization does not show there; cuts do), and has no
  ``prefill_ms@local``. ``energy_mj@local`` (per token, PyTorch decode) where the machine has
  energy counters.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from slimsearch.evaluators.metrics import COST_METRICS, Metrics, Provenance
from slimsearch.metric_names import DECODE_TOK_S, LOCAL_PROFILE

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimsearch.compress.llm_methods import DecoderRecord

CONTEXT_TOKENS = 128
MEMORY_CONTEXT = 2048
PROMPT_TOKENS = 32
DECODE_TOKENS = 16
REPEATS = 3


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


DECODE, PREFILL = f"{DECODE_TOK_S}@{LOCAL_PROFILE}", f"prefill_ms@{LOCAL_PROFILE}"
PAIRED_REPEATS = 5  # rounds of a paired timing: the median of 5 ratios


@dataclass(frozen=True)
class DecoderReference:
    """The teacher's deployed graph (a GenAI folder) and its figures taken in a quiet moment (a job's
    start): ``quiet`` maps ``decode_tok_s@local`` and ``prefill_ms@local`` to them. Build one with
    :func:`decoder_reference`."""

    graph: Path
    quiet: Mapping[str, float]


def decoder_reference(teacher: "nn.Module", quiet: Mapping[str, float]) -> Optional[DecoderReference]:
    """The teacher's graph, built once in a folder that lives as long as this process, and ``quiet``;
    None where the graph builder does not take the architecture (its candidates are timed unpaired).

    Raises:
        ConfigError: ``quiet`` lacks ``decode_tok_s@local`` or ``prefill_ms@local``, or one is not > 0.
    """
    import atexit
    import shutil
    import tempfile

    import torch

    from slimsearch.deploy.llm_graph import deployed_graph
    from slimsearch.exceptions import ConfigError, UnsupportedArchitecture

    for name in (DECODE, PREFILL):
        value = quiet.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"reference: the teacher's quiet {name} must be a number > 0, got {value!r}")
    folder = Path(tempfile.mkdtemp(prefix="slimsearch-teacher-graph-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    try:
        graph = deployed_graph(teacher, folder / "graph", threads=torch.get_num_threads())
    except UnsupportedArchitecture:
        return None
    return DecoderReference(Path(graph), {name: float(quiet[name]) for name in (DECODE, PREFILL)})


def measure_decoder(model: "nn.Module", task: Any, *, repeats: int = REPEATS, energy=None,
                    reference: Optional[DecoderReference] = None) -> dict[str, float]:
    """``latency_ms@local``, ``decode_tok_s@local`` and ``prefill_ms@local`` of the deployed graph,
    batch 1 (see the module's text), and ``energy_mj@local`` per token when ``energy`` (an
    EnergyMeter) is given. Without ``reference``, unpaired: a median of ``repeats`` runs in a fresh
    process, as loaded as the machine was; with it, paired with the teacher's graph over
    ``PAIRED_REPEATS`` rounds and scaled to its quiet figures."""
    import tempfile

    import torch

    from slimsearch.deploy.llm_graph import deployed_graph
    from slimsearch.deploy.llm_timing import time_generation
    from slimsearch.exceptions import UnsupportedArchitecture

    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="slimsearch-decode-") as tmp:
            graph = deployed_graph(model, Path(tmp) / "graph", threads=threads)
            timing = time_generation(graph, prompt_tokens=PROMPT_TOKENS, new_tokens=DECODE_TOKENS, threads=threads,
                                     repeats=repeats if reference is None else PAIRED_REPEATS,
                                     reference=None if reference is None else reference.graph)
        if reference is None:
            tok_s, prefill = timing["decode_tok_s"], timing["prefill_ms"]
        else:
            tok_s, prefill = paired_decoder_figures(timing, reference.quiet)
        values = {f"latency_ms@{LOCAL_PROFILE}": 1000.0 / tok_s, DECODE: tok_s, PREFILL: prefill}
    except UnsupportedArchitecture:
        ms = _torch_decode(model, task, repeats=repeats)
        values = {f"latency_ms@{LOCAL_PROFILE}": ms, f"{DECODE_TOK_S}@{LOCAL_PROFILE}": 1000.0 / ms}
    if energy is not None:
        values[f"energy_mj@{LOCAL_PROFILE}"] = _torch_decode(model, task, repeats=repeats, energy=energy)
    return values


def paired_decoder_figures(timing: Mapping[str, Any], quiet: Mapping[str, float]) -> tuple[float, float]:
    """Decode tokens/s and prefill ms of a paired timing (``time_generation`` with a reference): the
    median over rounds of the model's figure relative to the reference's in the same round, times the
    reference's ``quiet`` figure."""
    ref = timing["reference"]
    speed = statistics.median(r / m for m, r in zip(timing["decode_runs_ms_per_token"],
                                                    ref["decode_runs_ms_per_token"]))
    prefill = statistics.median(m / r for m, r in zip(timing["prefill_runs_ms"], ref["prefill_runs_ms"]))
    return quiet[DECODE] * speed, quiet[PREFILL] * prefill


def _torch_decode(model: "nn.Module", task: Any, *, repeats: int, energy=None) -> float:
    """Decode ms per token of the PyTorch model with its KV cache (hooks off: they simulate numerics
    a deployment does not run), or with ``energy`` its energy in mJ per token."""
    import torch

    from slimsearch.compress.llm_methods import hooks_off
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

        if energy is not None:
            return energy.measure(run, warmup=1, repeats=repeats, min_time_s=0.5).mj_per_call / DECODE_TOKENS
        return measure_latency(run, warmup=1, repeats=repeats).median_ms / DECODE_TOKENS


def decoder_costs(model: "nn.Module", profiles: Sequence[Any], power_modes: Optional[Mapping[str, str]] = None, *,
                  measured: Optional[Mapping[str, float]] = None,
                  record: Optional["DecoderRecord"] = None) -> Metrics:
    """The static costs of a decoder LLM and its modelled figures on each profile (see the module's
    text); ``measured`` figures (``@local``) are added as measured. ``record`` is what the LLM methods
    did to it (default: the model's own, :func:`~slimsearch.compress.llm_methods.record_of`)."""
    from slimsearch.compress.kv_cache import kv_cache_bytes
    from slimsearch.compress.llm_methods import record_of
    from slimsearch.evaluators.llm_costs import decoder_footprint, head_kwargs, weight_bytes
    from slimsearch.exceptions import ConfigError, UnsupportedOnDevice
    from slimsearch.hardware_profiles import load_profile, predict_decoder
    from slimsearch.structures import llm

    record = record or record_of(model)
    head = head_kwargs(record.head)
    footprint = decoder_footprint(model, quantized=record.quantized, kv_bits=record.kv_bits,
                                  act_bits=record.act_bits, sparsity=record.sparsity, **head)
    bitops = 0
    for path, module in llm.decoder_linears(model).items():
        n_in, n_out = llm.in_out(module)
        q = record.quantized.get(path)
        bitops += n_in * n_out * (q.bits if q is not None else 32) * (8 if path in record.act_paths else 32)
    vocab, hidden = model.get_input_embeddings().weight.shape
    bitops += vocab * hidden * (record.head.bits if record.head is not None else 32) * 32
    values: dict[str, Optional[float]] = {
        "size_bytes": float(weight_bytes(model, quantized=record.quantized, **head)),
        "params": float(sum(p.numel() for p in model.parameters())),
        "macs": float(footprint.macs),
        "bitops": float(bitops),
    }
    kv = (kv_cache_bytes(model, MEMORY_CONTEXT, record.kv_bits) if record.kv_bits < 16 else  # float32: twice 16 bits
          kv_cache_bytes(model, MEMORY_CONTEXT, 16) * record.kv_bits // 16)
    values["memory_bytes"] = values["size_bytes"] + float(kv)
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
        tok_s = 1000.0 / figures[0] if figures[0] else None
        for key, value in (*zip(COST_METRICS, figures), (DECODE_TOK_S, tok_s)):
            values[f"{key}@{profile.name}"] = value
            provenance[f"{key}@{profile.name}"] = Provenance.MODELLED
    return Metrics(values=values, provenance=provenance)
