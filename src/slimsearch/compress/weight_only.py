"""Weight-only post-training quantization of decoder LLMs: RTN, GPTQ or AWQ, one verb.

The decoder's linear layers keep their standard types (``nn.Linear``, GPT-2's ``Conv1D``)
and take the de-quantized float values of their weights, so the model stays a plain
Hugging Face model; the integer codes, float32 scales per group and zero points come
back as :class:`~slimsearch.compress.quant.grid.QuantizedWeight` in ``(out, in)``
orientation, which the deploy code packs (onnxruntime MatMulNBits, compressed-tensors).
The embedding and the (tied) output projection stay in float.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from slimsearch.compress._calibration import run_groups
from slimsearch.compress._weight_config import WeightMethod, WeightOnlyConfig, rtn_group
from slimsearch.exceptions import ConfigError
from slimsearch.structures import llm

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimsearch.compress.quant.grid import QuantizedWeight

__all__ = ["WeightMethod", "WeightOnlyConfig", "quantize_weights", "rtn"]


def rtn(model: "nn.Module", config: WeightOnlyConfig) -> dict[str, "QuantizedWeight"]:
    """Round every selected decoder linear to nearest on the config's grid, in place."""
    import torch

    config.check_blocks(model)
    out: dict[str, "QuantizedWeight"] = {}

    def process(index: int, group: llm.LinearGroup, paths: list[str]) -> None:
        bits = config.bits_for(index, group.name)
        if bits is not None:
            rtn_group(model, config, bits, paths, out)

    with torch.no_grad():
        run_groups(model, process, groups=config.active_groups())
    return out


def quantize_weights(model: "nn.Module", config: WeightOnlyConfig,
                     calib: Optional["torch.Tensor"] = None) -> dict[str, "QuantizedWeight"]:
    """Quantize the decoder's linear layers in place with ``config.method``.

    Args:
        model: a Hugging Face causal LM of a family :func:`slimsearch.structures.llm.family_of` knows.
        config: method, grid and which groups.
        calib: token windows ``(n, seq_len)``; needed by GPTQ and AWQ, unused by RTN.

    Returns:
        Full module path -> its quantized weight, ``(out, in)``.
    """
    llm.family_of(model)
    method = WeightMethod(config.method)
    if method is WeightMethod.RTN:
        return rtn(model, config)
    if calib is None:
        raise ConfigError(f"WeightOnlyConfig.method {method.value!r} needs calibration token windows; got none")
    if method is WeightMethod.GPTQ:
        from slimsearch.compress.gptq import gptq

        return gptq(model, config, calib)
    from slimsearch.compress.awq import awq

    return awq(model, config, calib)
