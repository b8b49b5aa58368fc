"""What each precision choice costs a decoder LLM, group by group: the table a planner solves over.

For every linear group (``"<block>.<group>"``, e.g. ``"3.down"``, or a group in every block) and
every weight choice (method x bits x group size x symmetry), the group alone is quantized that way
in the teacher and the model is scored on a few token windows against the teacher's own next-token
distribution: mean KL(teacher || model) per token (``kl``) and the change of mean next-token
negative log-likelihood (``nll``, whose base is the teacher's, so a total is a predicted NLL and
``exp`` of it a predicted perplexity). The KV-cache precisions are one more group (``kv``), scored
with only the cache rounded, and the output projection's widths another (``head``), scored with only
it rounded (a tied input embedding with it). Each option also carries what it adds to the costs: packed bytes
(``size_bytes``, exactly as :func:`~slimsearch.evaluators.llm_costs.weight_bytes` counts them) and
the modelled ``latency_ms@P`` and ``energy_mj@P`` per token on each profile
(:func:`~slimsearch.hardware_profiles.predict_decoder` at the context of
:mod:`slimsearch.evaluators.decoder`), as the change from the teacher's figure.

Cheap by construction: the teacher's block inputs are kept, so a group of block ``i`` is scored
by running blocks ``i`` onwards only; round-to-nearest is instant; GPTQ and AWQ run on that one
group in isolation (on the teacher's own inputs: in a full plan the earlier blocks are quantized
too), each one calibration pass.

Assumed, and only a prediction: the effects of groups add up. Sizes do exactly; losses do
approximately for small errors (a second-order Taylor view of the KL); modelled latency and energy
nearly (decode is memory-bound, linear in bytes; the compute precision follows the widest weight).
The search measures the plans it builds.

The loss part (the expensive one) is cached as a JSON file in a given folder (the job folder),
keyed by a hash of the model's weights, the windows, the calibration data and the choice list, so
a resumed or re-budgeted job reads it back; costs are recomputed each time (no forward pass).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

from slimsearch.exceptions import ConfigError
from slimsearch.spaces.plan import FULL_PRECISION, CompressionPlan, LayerPlan
from slimsearch.structures import llm

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["FLOAT", "HEAD_GROUP", "KL", "KV_GROUP", "NLL", "SIZE", "Sensitivity", "WHOLE_GROUPS", "WeightChoice",
           "llm_sensitivity", "option_bits", "plan_from_choice", "whole_option"]

FLOAT = "float"  # the option that leaves a group as the teacher has it
KV_GROUP, HEAD_GROUP = "kv", "head"
WHOLE_GROUPS = {KV_GROUP: "kv_bits", HEAD_GROUP: "head_bits"}  # model-wide groups -> the plan field they set
KL, NLL, SIZE = "kl", "nll", "size_bytes"
VERSION = 1  # of the cached loss file; a change of how losses are measured bumps it


@dataclass(frozen=True)
class WeightChoice:
    """One way to quantize a linear group's weights (the fields of
    :class:`~slimsearch.compress.weight_only.WeightOnlyConfig` a plan sets)."""

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        from slimsearch.compress.weight_only import WeightOnlyConfig

        config = WeightOnlyConfig(method=self.method, bits=self.bits, group_size=self.group_size,
                                  symmetric=self.symmetric)  # its checks, its messages
        object.__setattr__(self, "method", config.method)

    @property
    def name(self) -> str:
        """``rtn-w4-g128`` (``-asym`` appended when not symmetric): the option's name in a table."""
        return f"{self.method}-w{self.bits}-g{self.group_size}" + ("" if self.symmetric else "-asym")

    @property
    def mode(self) -> str:
        """What must be the same in every group of one plan: method, group size, symmetry (``rtn-g128``)."""
        return f"{self.method}-g{self.group_size}" + ("" if self.symmetric else "-asym")

    @classmethod
    def parse(cls, name: str) -> "WeightChoice":
        """The choice named ``name`` (as :attr:`name` writes it)."""
        parts = str(name).split("-")
        try:
            if len(parts) not in (3, 4) or parts[1][0] != "w" or parts[2][0] != "g" or parts[3:] not in ([], ["asym"]):
                raise ValueError
            return cls(parts[0], int(parts[1][1:]), int(parts[2][1:]), len(parts) == 3)
        except (ValueError, IndexError):
            raise ConfigError(f"weight option {name!r} must read <method>-w<bits>-g<group size>[-asym], "
                              "e.g. 'gptq-w4-g128'") from None


def whole_option(group: str, bits: int) -> str:
    """The option of a model-wide group (:data:`WHOLE_GROUPS`) at ``bits``: ``kv8``, ``head8``; ``float`` at 32."""
    return FLOAT if bits >= FULL_PRECISION else f"{group}{bits}"


def option_bits(group: str, option: str) -> int:
    """The bits of a model-wide group's option (32 for ``float``), as :func:`whole_option` names it."""
    if option == FLOAT:
        return FULL_PRECISION
    if option.startswith(group) and option[len(group):].isdigit():
        return int(option[len(group):])
    raise ConfigError(f"the {group} option must be 'float' or {group}<bits>, got {option!r}")


def kv_option(bits: int) -> str:
    """The option name of a KV-cache precision (``kv8``)."""
    return whole_option(KV_GROUP, bits)


@dataclass(frozen=True)
class Sensitivity:
    """Per group and option, the predicted loss and cost measures; the constant parts apart.

    Attributes:
        key: the hash of the inputs the losses were measured on.
        options: group -> option -> measure -> value: the group's packed ``size_bytes`` (the ``kv``
            group's are 0), and for every other measure the change from the teacher (0 for ``float``;
            ``nll`` floored at 0, :func:`_floored`).
        base: measure -> the constant part: ``kl`` 0, ``nll`` the teacher's on the windows, the bytes
            outside the groups (embedding, norms, biases), the teacher's modelled figures. A total over
            one option per group is the prediction; ``size_bytes`` is exact.
        modes: weight option -> its mode (every quantized group of a plan shares one).
        cached: the losses were read from the folder's cache, not measured by this call.

    The fields are those of :class:`slimsearch.search.planner.Problem`:
    ``Problem(s.options, s.base, s.modes)``.
    """

    key: str
    options: Mapping[str, Mapping[str, Mapping[str, float]]]
    base: Mapping[str, float]
    modes: Mapping[str, str] = field(default_factory=dict)
    cached: bool = field(default=False, compare=False)  # how it was obtained, not what it holds

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Sensitivity":
        data = json.loads(text)
        return cls(data["key"], data["options"], data["base"], data.get("modes", {}), data.get("cached", False))


def _check_inputs(choices: Sequence[WeightChoice], kv_bits: Sequence[int],
                  head_bits: Sequence[int]) -> tuple[tuple, tuple, tuple]:
    from slimsearch.compress.kv_cache import KV_BITS
    from slimsearch.compress.output_head import HEAD_BITS

    choices = tuple(choices)
    if not choices and not kv_bits and not head_bits:
        raise ConfigError("llm_sensitivity needs at least one weight choice, KV precision or output projection "
                          "width; got none")
    for c in choices:
        if not isinstance(c, WeightChoice):
            raise ConfigError(f"llm_sensitivity choices must be WeightChoice values, got {c!r}")
    if len({c.name for c in choices}) != len(choices):
        raise ConfigError(f"llm_sensitivity choices must differ, got {[c.name for c in choices]}")
    for b in kv_bits:
        if isinstance(b, bool) or b not in KV_BITS:
            raise ConfigError(f"llm_sensitivity kv_bits must be among {list(KV_BITS)}, got {b!r}")
    for b in head_bits:
        if isinstance(b, bool) or b not in HEAD_BITS:
            raise ConfigError(f"llm_sensitivity head_bits must be among {list(HEAD_BITS)}, got {b!r}")
    return choices, tuple(sorted(set(kv_bits), reverse=True)), tuple(sorted(set(head_bits), reverse=True))


def group_names(model: "nn.Module", per_block: bool = True) -> tuple[str, ...]:
    """The model's linear groups as a table names them: ``"<block>.<group>"``, or the group names."""
    if per_block:
        return llm.block_group_names(model)
    return tuple(g.name for g in llm.family_of(model).groups)


def _paths(model: "nn.Module", group: str) -> list[str]:
    block, _, name = group.rpartition(".")
    return [p for i, g, paths in llm.group_linears(model) if g.name == name and (not block or i == int(block))
            for p in paths]


def cache_key(model: "nn.Module", windows: "torch.Tensor", calib: Optional["torch.Tensor"],
              choices: Sequence[WeightChoice], kv_bits: Sequence[int], per_block: bool,
              head_bits: Sequence[int] = ()) -> str:
    """SHA-256 of everything the losses depend on: weights (names, dtypes, shapes, values), windows,
    calibration data, the choices and the granularity."""
    import torch

    listed = {"version": VERSION, "choices": [c.name for c in choices], "kv_bits": list(kv_bits),
              "per_block": per_block, **({"head_bits": list(head_bits)} if head_bits else {})}
    digest = hashlib.sha256(json.dumps(listed).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).detach().cpu().numpy().tobytes() if t.numel() else b"")
    for data in (windows, calib):
        if data is not None:
            digest.update(str(tuple(data.shape)).encode() + data.to(torch.int64).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Scorer:
    """The teacher's block inputs and next-token log-probabilities on the windows, and the score of
    the model as changed now, run from a given block on."""

    def __init__(self, model: "nn.Module", windows: "torch.Tensor", batch_size: int) -> None:
        self.model, self.windows = model, windows
        self.blocks = llm.blocks(model)
        self.norm = llm.get(model, llm.family_of(model).final_norm)
        self.head = model.get_output_embeddings()
        self.batch_size = batch_size

    def prepare(self) -> None:
        """Keep every block's inputs and the teacher's log-probabilities (model not yet changed)."""
        from slimsearch.compress._calibration import capture_block_inputs, inference, run_block

        stored = capture_block_inputs(self.model, self.windows, self.batch_size)
        self.inputs = [stored]
        with inference(self.model):
            for block in self.blocks:
                stored = [run_block(block, args, kwargs) for args, kwargs in stored]
                self.inputs.append(stored)
        self.teacher = [self._log_probs(args, kwargs) for args, kwargs in stored]
        self.teacher_nll = self.score(len(self.blocks))[1]

    def _log_probs(self, args: tuple, kwargs: dict) -> "torch.Tensor":
        import torch

        with torch.no_grad():
            hidden = args[0] if args else kwargs["hidden_states"]
            return torch.log_softmax(self.head(self.norm(hidden))[:, :-1].float(), dim=-1)

    def score(self, start: int, *, embedded: bool = False) -> tuple[float, float]:
        """Mean KL(teacher || model) and mean NLL per predicted token, running blocks ``start`` on
        (with ``embedded``, every block, on inputs embedded afresh: a tied output projection that was
        rounded changed the embedding the teacher's kept inputs came from)."""
        import torch.nn.functional as F

        from slimsearch.compress._calibration import capture_block_inputs, inference, run_block

        inputs = self.inputs[start]
        if embedded:
            inputs, start = capture_block_inputs(self.model, self.windows, self.batch_size), 0
        kl = nll = 0.0
        with inference(self.model):
            for (args, kwargs), log_q, lo in zip(inputs, self.teacher,
                                                 range(0, self.windows.shape[0], self.batch_size)):
                for block in self.blocks[start:]:
                    args, kwargs = run_block(block, args, kwargs)
                log_p = self._log_probs(args, kwargs)
                targets = self.windows[lo:lo + self.batch_size, 1:].to(log_p.device)
                kl += float(F.kl_div(log_p, log_q, log_target=True, reduction="sum"))  # as score_lm
                nll += float(F.nll_loss(log_p.flatten(0, 1), targets.flatten(), reduction="sum"))
        tokens = self.windows.shape[0] * (self.windows.shape[1] - 1)
        return max(kl / tokens, 0.0), nll / tokens  # a KL is >= 0; float32 sums of a tiny one may dip below


def _losses(model: "nn.Module", windows: "torch.Tensor", calib: Optional["torch.Tensor"], groups: Sequence[str],
            choices: Sequence[WeightChoice], kv_bits: Sequence[int], head_bits: Sequence[int],
            batch_size: int) -> dict[str, Any]:
    """Measure every option's ``kl`` and ``nll`` change (the expensive part); the model is left as it was."""
    import torch

    from slimsearch.compress.kv_cache import KVCacheConfig, quantize_kv_cache
    from slimsearch.compress.output_head import quantize_output_projection
    from slimsearch.compress.weight_only import WeightOnlyConfig, quantize_weights

    scorer = _Scorer(model, windows, batch_size)
    scorer.prepare()
    n = len(scorer.blocks)
    losses: dict[str, dict[str, dict[str, float]]] = {}
    for group in groups:
        block, _, name = group.rpartition(".")
        touched = [int(block)] if block else list(range(n))
        start = touched[0]
        losses[group] = {}
        for choice in choices:
            saved = {i: {k: v.clone() for k, v in scorer.blocks[i].state_dict().items()} for i in touched}
            config = WeightOnlyConfig(method=choice.method, bits=choice.bits, group_size=choice.group_size,
                                      symmetric=choice.symmetric, groups=(),
                                      overrides={f"{i}.{name}": choice.bits for i in touched})
            try:
                quantize_weights(model, config, calib if calib is not None else windows)
                kl, nll = scorer.score(start)
            finally:
                for i, state in saved.items():
                    scorer.blocks[i].load_state_dict(state)
            losses[group][choice.name] = {KL: kl, NLL: nll - scorer.teacher_nll}
    if kv_bits:
        losses[KV_GROUP] = {}
        for bits in kv_bits:
            hooks = quantize_kv_cache(model, KVCacheConfig(bits))
            try:
                kl, nll = scorer.score(0)
            finally:
                hooks.remove()
            losses[KV_GROUP][kv_option(bits)] = {KL: kl, NLL: nll - scorer.teacher_nll}
    if head_bits:
        losses[HEAD_GROUP] = {}
        head = model.get_output_embeddings().weight
        saved = head.detach().clone()
        for bits in head_bits:
            try:
                quantize_output_projection(model, bits=bits)
                kl, nll = scorer.score(n, embedded=llm.tied(model))
            finally:
                with torch.no_grad():
                    head.copy_(saved)
            losses[HEAD_GROUP][whole_option(HEAD_GROUP, bits)] = {KL: kl, NLL: nll - scorer.teacher_nll}
    return {"version": VERSION, "teacher_nll": scorer.teacher_nll, "losses": losses}


def _costs(model: "nn.Module", groups: Sequence[str], choices: Sequence[WeightChoice], kv_bits: Sequence[int],
           head_bits: Sequence[int], profiles: Sequence[Any]) -> tuple[dict, dict]:
    """Per group and option the change of each cost measure, and the teacher's figures (the base)."""
    from slimsearch.compress.output_head import HEAD_GROUP_SIZE
    from slimsearch.evaluators.decoder import CONTEXT_TOKENS
    from slimsearch.evaluators.llm_costs import (FLOAT_BYTES, decoder_footprint, lm_head_bytes,
                                                 quantized_linear_bytes, weight_bytes)
    from slimsearch.hardware_profiles import load_profile, predict_decoder

    profiles = [load_profile(p) for p in profiles]
    teacher = decoder_footprint(model)

    def modelled(footprint) -> dict[str, float]:
        out = {}
        for profile in profiles:
            pred = predict_decoder(profile, footprint, prompt_tokens=CONTEXT_TOKENS, context_tokens=CONTEXT_TOKENS)
            out[f"latency_ms@{profile.name}"] = pred.decode_ms_per_token
            out[f"energy_mj@{profile.name}"] = pred.energy_mj_per_token
        return out

    base_modelled = modelled(teacher)

    def change(footprint) -> dict[str, float]:
        return {k: v - base_modelled[k] for k, v in modelled(footprint).items()}

    zero = {SIZE: 0.0, **{k: 0.0 for k in base_modelled}}
    options: dict[str, dict[str, dict[str, float]]] = {}
    base_size = weight_bytes(model)
    for group in groups:
        shapes = [llm.in_out(llm.get(model, p)) for p in _paths(model, group)]
        base_size -= sum(i * o * FLOAT_BYTES for i, o in shapes)  # the float option holds these
        options[group] = {FLOAT: {**zero, SIZE: float(sum(i * o * FLOAT_BYTES for i, o in shapes))}}
        for c in choices:
            delta = sum(quantized_linear_bytes(i, o, c.bits, c.group_size, c.symmetric) - i * o * FLOAT_BYTES
                        for i, o in shapes)
            footprint = dataclasses.replace(teacher, weight_bytes=teacher.weight_bytes + delta, weight_bits=c.bits)
            options[group][c.name] = {SIZE: options[group][FLOAT][SIZE] + delta, **change(footprint)}
    if kv_bits:
        options[KV_GROUP] = {FLOAT: zero, **{kv_option(b): {SIZE: 0.0, **change(decoder_footprint(model, kv_bits=b))}
                                             for b in kv_bits}}
    if head_bits:
        vocab, hidden = model.get_input_embeddings().weight.shape
        float_head = float(vocab * hidden * FLOAT_BYTES)
        base_size -= float_head  # the float option holds it (a tied embedding is these bytes too)
        options[HEAD_GROUP] = {FLOAT: {**zero, SIZE: float_head}, **{
            whole_option(HEAD_GROUP, b): {SIZE: float(lm_head_bytes(vocab, hidden, b, HEAD_GROUP_SIZE)), **change(
                decoder_footprint(model, lm_head_bits=b, lm_head_group=HEAD_GROUP_SIZE))} for b in head_bits}}
    return options, {SIZE: float(base_size), **base_modelled}


def llm_sensitivity(model: "nn.Module", windows: "torch.Tensor", choices: Sequence[WeightChoice], *,
                    kv_bits: Sequence[int] = (), head_bits: Sequence[int] = (), per_block: bool = True,
                    calib: Optional["torch.Tensor"] = None,
                    profiles: Sequence[Any] = (), folder: Union[str, Path, None] = None,
                    batch_size: int = 1) -> Sensitivity:
    """The sensitivity table of the decoder ``model`` (the teacher, unchanged on return).

    Args:
        model: a Hugging Face causal LM of a family :mod:`slimsearch.structures.llm` knows.
        windows: token windows ``(n, seq_len)`` the losses are measured on (a few suffice).
        choices: the weight choices of every group (``float`` is always an option).
        kv_bits: KV-cache precisions to score (16, 8, 4); none: no ``kv`` group.
        head_bits: widths of the output projection to score (8, 4; in blocks of 64); none: no ``head`` group.
        per_block: a group per block (``"3.down"``) or one per group name across blocks (``"down"``).
        calib: the windows GPTQ and AWQ fit on (default: ``windows``).
        profiles: hardware profiles (names or profiles) whose modelled figures become measures.
        folder: where the losses are cached (created if missing); None: not cached.
        batch_size: windows per forward pass.
    """
    from slimsearch._io import atomic_write

    choices, kv_bits, head_bits = _check_inputs(choices, kv_bits, head_bits)
    llm.family_of(model)
    groups = group_names(model, per_block)
    key = cache_key(model, windows, calib, choices, kv_bits, per_block, head_bits)
    path = Path(folder) / f"sensitivity-{key[:20]}.json" if folder is not None else None
    measured = None
    if path is not None and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        measured = data if data.get("version") == VERSION and data.get("key") == key else None
    cached = measured is not None
    if measured is None:
        measured = {**_losses(model, windows, calib, groups, choices, kv_bits, head_bits, batch_size), "key": key}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(measured, sort_keys=True))
    costs, base = _costs(model, groups, choices, kv_bits, head_bits, profiles)
    zero_loss = {KL: 0.0, NLL: 0.0}
    options = {g: {o: {**_floored(measured["losses"][g].get(o) or zero_loss), **values} for o, values in opts.items()}
               for g, opts in costs.items()}
    base = {KL: 0.0, NLL: float(measured["teacher_nll"]), **base}
    return Sensitivity(key, options, base, {c.name: c.mode for c in choices}, cached)


def _floored(losses: Mapping[str, float]) -> dict[str, float]:
    """A group's measured losses with the NLL change floored at 0. On a few windows, rounding a group
    sometimes lowers the NLL a little: noise, not a gain an optimiser can bank on. Summed as measured,
    a planner picks exactly those groups and predicts too little (SmolLM2-135M, 120 groups per block:
    plans predicted +0.6% and +1.9% measured +5.1% and +6.2% on validation; floored, the sums read
    +5.9% and +7.3%)."""
    return {**losses, NLL: max(0.0, float(losses[NLL]))}


def plan_from_choice(chosen: Mapping[str, str], *, base: CompressionPlan = CompressionPlan()) -> CompressionPlan:
    """The plan of one option per group (a planner's :attr:`~slimsearch.search.planner.Selection.chosen`),
    on top of ``base`` (its model-wide choices and other layers kept): quantized groups as layer plans
    (``"3.down"`` keys per block), the shared method as ``weight_method``, the ``kv`` option as
    ``kv_bits``, the ``head`` option as ``head_bits``. ``apply_plan`` builds it."""
    weights = {g: WeightChoice.parse(o) for g, o in chosen.items() if g not in WHOLE_GROUPS and o != FLOAT}
    modes = sorted({c.mode for c in weights.values()})
    if len(modes) > 1:
        raise ConfigError(f"plan_from_choice: quantized groups must share method, group size and symmetry, "
                          f"got {modes}")
    layers = dict(base.layers)
    first = next(iter(weights.values()), None)
    for group, option in chosen.items():
        if group in WHOLE_GROUPS:
            continue
        own = layers.get(group, LayerPlan())
        if option == FLOAT:
            if group in layers or group.partition(".")[2] in layers:  # over the base's bits for it
                layers[group] = dataclasses.replace(own, weight_bits=FULL_PRECISION)
            continue
        c = weights[group]
        layers[group] = dataclasses.replace(own, weight_bits=c.bits, group_size=c.group_size, symmetric=c.symmetric)
    changes: dict[str, Any] = {"layers": layers}
    if first is not None:
        changes["weight_method"] = first.method
    for group, field_name in WHOLE_GROUPS.items():
        if group in chosen:
            changes[field_name] = option_bits(group, chosen[group])
    return dataclasses.replace(base, **changes)
