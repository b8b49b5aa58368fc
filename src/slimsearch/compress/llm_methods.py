"""The compression methods of decoder LLMs (causal-lm tasks), registered as every method is.

Each reads its config off the plan and runs one of the library functions of this package:

====================  =====  ==============================================  ==============================
method                order  plan choices                                    runs
====================  =====  ==============================================  ==============================
``llm_cut``           10     ``ffn_keep``, ``kv_groups_keep``,               :func:`~slimsearch.structures.llm_cuts.cut`
                             ``hidden_keep``, ``drop_layers``                (a new standard model)
``heal``              15     ``distill_steps``, ``distill_lr``               :func:`~slimsearch.compress.heal.heal`
``wanda``             17     ``sparsity: 0.5`` with ``sparsity_pattern: 2:4``  :func:`~slimsearch.compress.wanda.sparsify`
``smoothquant``       18     ``act_bits: 8``, ``smooth_alpha``               :func:`~slimsearch.compress.smoothquant.smooth`
                                                                             + per-token int8 inputs
``weight_only``       20     ``weight_bits`` < 32, ``weight_method``,        :func:`~slimsearch.compress.weight_only.quantize_weights`
                             ``group_size``, ``symmetric``
``output_head``       22     ``head_bits`` < 32                              :func:`~slimsearch.compress.output_head.quantize_output_projection`
``kv_cache``          25     ``kv_bits`` < 32                                :func:`~slimsearch.compress.kv_cache.quantize_kv_cache`
====================  =====  ==============================================  ==============================

Per-layer choices of a causal LM are keyed by linear group (``qkv``, ``o``, ``gate_up``,
``down``) and hold in every block, as cuts do; a key ``"<block>.<group>"`` (``"11.down"``) sets the
weight bits of that group in that block alone (32: left in float), over its group's key. Method,
group size and symmetry stay model-wide. Healing comes after the cut and before the
post-training methods, which then see the healed weights. Calibration windows are the task's
``train`` split (its calibration text).

What a method did that the model's weights cannot say (the integer codes of quantized
linears and of the output projection, the KV-cache and activation precision, the 2:4 pattern)
is kept on the model as a :class:`DecoderRecord` (:func:`record_of`), which the costing reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

from slimsearch.compress.kv_cache import KVCacheConfig
from slimsearch.compress.output_head import HeadConfig
from slimsearch.compress.registry import Context, register
from slimsearch.compress.wanda import WandaConfig
from slimsearch.exceptions import ConfigError
from slimsearch.metric_names import TaskFamily
from slimsearch.spaces.plan import FULL_PRECISION, CompressionPlan
from slimsearch.structures import llm

if TYPE_CHECKING:
    from torch import nn

    from slimsearch.compress.quant.grid import QuantizedWeight
    from slimsearch.tasks import Task

LLM = (TaskFamily.CAUSAL_LM,)
RECORD_ATTR = "slimsearch_record"
NM = "2:4"
ACT_BITS = 8


@dataclass
class DecoderRecord:
    """What the LLM methods did to a model, beyond its (de-quantized, float) weights.

    Attributes:
        quantized: module path -> the quantized weight (codes, scales) of each quantized linear.
        kv_bits: KV-cache precision (32: float, as the model computes).
        act_paths: linears whose inputs are int8 per token (SmoothQuant).
        act_bits: the activation precision of the whole decoder: 8 when every linear's input is
            int8, else 32.
        sparsity: ``"2:4"`` when every decoder linear is 2:4 sparse, else None (a partly sparse
            model is costed dense: no device runs half its layers sparse).
        head: the codes of the output projection (and a tied embedding) when rounded, else None.
    """

    quantized: dict = field(default_factory=dict)
    kv_bits: int = FULL_PRECISION
    act_paths: tuple[str, ...] = ()
    act_bits: int = FULL_PRECISION
    sparsity: Optional[str] = None
    head: Optional["QuantizedWeight"] = None


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


def record_of(model: "nn.Module") -> DecoderRecord:
    """The record of what the LLM methods did to ``model`` (an empty one for a model they left as it was)."""
    return getattr(model, RECORD_ATTR, None) or DecoderRecord()


def _update(model: "nn.Module", **changes) -> None:
    setattr(model, RECORD_ATTR, dataclasses.replace(record_of(model), **changes))


def _calibration(context: Context):
    return context.task.train.x


def _groups_where(plan: CompressionPlan, keep) -> dict[str, Any]:
    """Linear group name -> its layer plan, for the groups whose plan ``keep`` accepts."""
    return {name: lp for name, lp in plan.layers.items() if keep(lp)}


# ---- llm_cut -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LLMCutConfig:
    """Uniform structured cuts (Minitron): shares of FFN channels, key/value groups and hidden
    channels every block keeps, and how many blocks are removed."""

    ffn_keep: float = 1.0
    kv_groups_keep: float = 1.0
    hidden_keep: float = 1.0
    drop_layers: int = 0

    def __post_init__(self) -> None:
        for name in ("ffn_keep", "kv_groups_keep", "hidden_keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"LLMCutConfig.{name} must be a share in (0, 1], got {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.drop_layers, bool) or not isinstance(self.drop_layers, int) or self.drop_layers < 0:
            raise ConfigError(f"LLMCutConfig.drop_layers must be a whole number >= 0, got {self.drop_layers!r}")

    def cut_kwargs(self) -> dict:
        """The keywords of :func:`~slimsearch.structures.llm_cuts.cut` (a share of 1 keeps all)."""
        return {"ffn_keep": None if self.ffn_keep == 1 else self.ffn_keep,
                "kv_groups_keep": None if self.kv_groups_keep == 1 else self.kv_groups_keep,
                "hidden_keep": None if self.hidden_keep == 1 else self.hidden_keep,
                "drop_layers": self.drop_layers}


def _cut_from_plan(plan: CompressionPlan) -> Optional[LLMCutConfig]:
    config = LLMCutConfig(plan.ffn_keep, plan.kv_groups_keep, plan.hidden_keep, plan.drop_layers)
    return None if config == LLMCutConfig() else config


@register("llm_cut", LLMCutConfig, order=10, from_plan=_cut_from_plan, copies=True, families=LLM)
def llm_cut(model, config: LLMCutConfig, context: Context):
    """A smaller standard model: channels and groups ranked on the calibration windows, cut uniformly."""
    from slimsearch.structures.llm_cuts import cut, importance

    return cut(model, importance(model, _calibration(context)), **config.cut_kwargs())


# ---- heal --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HealConfig:
    """A short distillation of the cut model towards its teacher (the plan's ``distill_*``)."""

    steps: int
    lr: float = 3e-4  # the causal-lm default of distill_lr: what healed SmolLM2 best (compress/heal.py)


def _heal_from_plan(plan: CompressionPlan) -> Optional[HealConfig]:
    return HealConfig(plan.distill.steps, plan.distill.lr) if plan.distill.steps > 0 else None


@register("heal", HealConfig, order=15, from_plan=_heal_from_plan, families=LLM)
def heal_step(model, config: HealConfig, context: Context):
    """``config.steps`` AdamW steps of KL to the teacher, one calibration window per step; runs to the end
    (early stopping judges classification distillation only: a causal LM is quantized after healing, so
    part way its perplexity says little of the candidate's)."""
    from slimsearch.compress.heal import heal

    for p in model.parameters():
        p.requires_grad_(True)
    return heal(model, context.task.teacher, _calibration(context), steps=config.steps, lr=config.lr,
                batch_size=1, seq_len=None)


# ---- wanda -------------------------------------------------------------------------------------

def _wanda_from_plan(plan: CompressionPlan) -> Optional[WandaConfig]:
    groups = _groups_where(plan, lambda lp: lp.sparsity > 0 and lp.sparsity_pattern == NM)
    return WandaConfig(pattern=NM, groups=tuple(groups)) if groups else None


@register("wanda", WandaConfig, order=17, from_plan=_wanda_from_plan, families=LLM)
def wanda(model, config: WandaConfig, context: Context):
    """2:4 sparsity of the named groups' linears by Wanda's score."""
    from slimsearch.compress.wanda import GROUP_NAMES, sparsify

    sparsify(model, config, _calibration(context))
    _update(model, sparsity=NM if set(config.groups) >= set(GROUP_NAMES) else None)
    return model


# ---- smoothquant -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SmoothQuantStep:
    """SmoothQuant's scales folded in (migration strength ``alpha``) and the inputs of the linears of
    ``groups`` rounded to int8 per token; their weights are quantized by ``weight_only`` (8 bits,
    per channel, symmetric: SmoothQuant's W8A8)."""

    alpha: float = 0.5
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))


def _smooth_from_plan(plan: CompressionPlan) -> Optional[SmoothQuantStep]:
    groups = _groups_where(plan, lambda lp: lp.act_bits == ACT_BITS)
    return SmoothQuantStep(plan.smooth_alpha, tuple(groups)) if groups else None


@register("smoothquant", SmoothQuantStep, order=18, from_plan=_smooth_from_plan, families=LLM)
def smoothquant_step(model, config: SmoothQuantStep, context: Context):
    """Fold the scales into every foldable group (the float model computes the same function), then
    fake-quantize the chosen groups' inputs to int8 per token, dynamically."""
    from slimsearch.compress.smoothquant import SmoothQuantConfig, fake_quant_per_token, smooth

    smooth(model, SmoothQuantConfig(alpha=config.alpha), _calibration(context))

    def hook(_module, args):
        return (fake_quant_per_token(args[0], ACT_BITS),) + tuple(args[1:])

    paths = [p for _, group, members in llm.group_linears(model) if group.name in config.groups for p in members]
    for path in paths:
        llm.get(model, path).register_forward_pre_hook(hook)
    every = len(paths) == len(llm.decoder_linears(model))
    _update(model, act_paths=tuple(paths), act_bits=ACT_BITS if every else FULL_PRECISION)
    return model


# ---- weight_only -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LLMWeightsConfig:
    """Weight-only quantization of a decoder's linear groups: bits per group (in every block) or per block's group,
    the rounding method, the grid."""

    method: str = "rtn"
    bits: Mapping[str, int] = field(default_factory=dict)  # group or "block.group" -> bits (32: float)
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", dict(self.bits))

    def bits_for(self, block: int, group: str) -> Optional[int]:
        """Bits of ``group`` in ``block`` (its own key first, then its group's), None when in float."""
        bits = self.bits.get(f"{block}.{group}", self.bits.get(group))
        return None if bits is None or bits >= FULL_PRECISION else int(bits)

    def weight_config(self, blocks: int):
        """The :class:`~slimsearch.compress.weight_only.WeightOnlyConfig` of a model of ``blocks`` blocks:
        the commonest width for its groups, every other group's width and every block's own key as
        per-block overrides."""
        from slimsearch.compress._weight_config import FLOAT, WeightOnlyConfig

        per_group = {g: b for g, b in self.bits.items() if not _block_key(g)}
        per_block = {k: (FLOAT if b >= FULL_PRECISION else b) for k, b in self.bits.items() if _block_key(k)}
        quantized = [b for b in self.bits.values() if b < FULL_PRECISION]
        common = Counter(per_group.values() or quantized).most_common(1)[0][0]
        groups = tuple(g for g, b in per_group.items() if b == common)
        overrides = {f"{i}.{g}": b for g, b in per_group.items() if b != common for i in range(blocks)}
        return WeightOnlyConfig(method=self.method, bits=common, group_size=self.group_size,
                                symmetric=self.symmetric, groups=groups, overrides={**overrides, **per_block})


def _block_key(name: str) -> bool:
    """Whether a layer key names one block's group (``"11.down"``) rather than a group in every block."""
    return name.partition(".")[0].isdigit()


def _weights_from_plan(plan: CompressionPlan) -> Optional[LLMWeightsConfig]:
    chosen = _groups_where(plan, lambda lp: lp.weight_bits < FULL_PRECISION)
    if not chosen:
        return None
    first = next(iter(chosen.values()))
    bits = {g: lp.weight_bits for g, lp in chosen.items()}
    bits.update({k: lp.weight_bits for k, lp in plan.layers.items() if _block_key(k)})  # a float block too
    return LLMWeightsConfig(plan.weight_method, bits, first.group_size, first.symmetric)


@register("weight_only", LLMWeightsConfig, order=20, from_plan=_weights_from_plan, families=LLM)
def weight_only(model, config: LLMWeightsConfig, context: Context):
    """RTN, GPTQ or AWQ of the chosen groups, in place; the codes go to the model's record."""
    from slimsearch.compress.weight_only import quantize_weights

    quantized = quantize_weights(model, config.weight_config(len(llm.blocks(model))), _calibration(context))
    _update(model, quantized={**record_of(model).quantized, **quantized})
    return model


# ---- output_head ---------------------------------------------------------------------------------

def _head_from_plan(plan: CompressionPlan) -> Optional[HeadConfig]:
    return HeadConfig(plan.head_bits) if plan.head_bits < FULL_PRECISION else None


@register("output_head", HeadConfig, order=22, from_plan=_head_from_plan, families=LLM)
def output_head(model, config: HeadConfig, context: Context):
    """The output projection (a tied embedding with it) rounded to nearest, in place; its codes go to the record."""
    from slimsearch.compress.output_head import quantize_output_projection

    _update(model, head=quantize_output_projection(model, bits=config.bits, group_size=config.group_size))
    return model


# ---- kv_cache ----------------------------------------------------------------------------------

def _kv_from_plan(plan: CompressionPlan) -> Optional[KVCacheConfig]:
    return KVCacheConfig(plan.kv_bits) if plan.kv_bits < FULL_PRECISION else None


@register("kv_cache", KVCacheConfig, order=25, from_plan=_kv_from_plan, families=LLM)
def kv_cache(model, config: KVCacheConfig, context: Context):
    """Keys and values rounded as a ``config.bits`` cache stores them."""
    from slimsearch.compress.kv_cache import quantize_kv_cache

    quantize_kv_cache(model, config)
    _update(model, kv_bits=config.bits)
    return model


# ---- the shape of a plan, without its numerics ---------------------------------------------------

def planned_shape(task: "Task", plan: CompressionPlan) -> tuple["nn.Module", DecoderRecord]:
    """The model ``plan`` makes of the teacher as far as its costs go, and its record: cut to the plan's
    shape (with flat scores: which channels are kept changes no cost; the teacher itself when nothing is
    cut, not to be changed) and the bits, KV-cache precision, activation precision and sparsity the plan
    gives it, without the numerics (no calibration, no rounding, no healing). What
    :func:`~slimsearch.evaluators.estimate.estimate` costs before a candidate is built; the built
    candidate costs the same."""
    import torch

    from slimsearch.structures.llm_cuts import DecoderImportance, cut

    teacher = task.teacher
    config = _cut_from_plan(plan)
    if config is None:
        model = teacher
    else:
        n_heads, n_kv, _ = llm.heads(teacher)
        groups = n_heads if llm.family_of(teacher).model_types[0] == "gpt2" else n_kv
        n = len(llm.blocks(teacher))
        hidden = teacher.get_input_embeddings().weight.shape[1]
        flat = DecoderImportance(ffn=tuple(torch.zeros(llm.ffn_width(teacher)) for _ in range(n)),
                                 attention=tuple(torch.zeros(groups) for _ in range(n)),
                                 layers=torch.zeros(n), hidden=torch.zeros(hidden), tokens=1)
        model = cut(teacher, flat, **config.cut_kwargs())
    weights = _weights_from_plan(plan)
    quantized = {}
    if weights is not None:
        for index, group, paths in llm.group_linears(model):
            bits = weights.bits_for(index, group.name)
            if bits is not None:
                stand_in = SimpleNamespace(bits=bits, group_size=weights.group_size, symmetric=weights.symmetric)
                quantized.update({p: stand_in for p in paths})
    wanda_config, smooth_config = _wanda_from_plan(plan), _smooth_from_plan(plan)
    from slimsearch.compress.wanda import GROUP_NAMES

    every = set(GROUP_NAMES)
    act_paths = tuple(p for _, group, paths in llm.group_linears(model)
                      if smooth_config is not None and group.name in smooth_config.groups for p in paths)
    head = _head_from_plan(plan)
    return model, DecoderRecord(
        quantized=quantized, kv_bits=plan.kv_bits, act_paths=act_paths,
        head=None if head is None else SimpleNamespace(bits=head.bits, group_size=head.group_size, symmetric=True),
        act_bits=ACT_BITS if smooth_config is not None and set(smooth_config.groups) >= every else FULL_PRECISION,
        sparsity=NM if wanda_config is not None and set(wanda_config.groups) >= every else None)
