"""A compressed decoder LLM as a Hugging Face folder: config, safetensors, tokenizer.

Quantized linears are written in the compressed-tensors ``pack-quantized`` format (the
format llm-compressor writes and vLLM serves): ``weight_packed`` (codes packed densely into
int32), ``weight_scale``, ``weight_shape`` and, when asymmetric, ``weight_zero_point``, with a
``quantization_config`` in config.json naming each layer's scheme. The codes are ours, as
the quantizer chose them, not re-rounded. ``AutoModelForCausalLM.from_pretrained`` loads
such a folder on CPU by decompressing the weights to float on the first forward pass
(transformers 5.25 with compressed-tensors 0.20.1).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from slimsearch.compress.quant.grid import QuantizedWeight

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = "pack-quantized"


def save_hf_folder(model: "nn.Module", tokenizer: Any, out: PathLike, *,
                   quantized: Optional[Mapping[str, "QuantizedWeight"]] = None, overwrite: bool = False,
                   check_weights: bool = True) -> Path:
    """Write ``model`` (and ``tokenizer``, if given) as a folder ``from_pretrained`` loads.

    ``quantized`` maps module paths to the codes of layers the model holds de-quantized;
    those layers are stored packed (see the module docstring); with ``check_weights``
    each must hold exactly its de-quantized codes. A tied output projection stays tied:
    if it is among ``quantized`` it is written as the float tensor it shares with the
    input embedding (compressed-tensors packs linears, not embeddings). The folder is
    written beside ``out`` and renamed into place; an existing non-empty ``out`` is
    refused unless ``overwrite``.
    """
    import torch

    from slimsearch.structures.llm import is_conv1d, tied

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    quantized = dict(quantized or {})
    head = model.get_output_embeddings()
    if tied(model):
        quantized = {p: q for p, q in quantized.items() if model.get_submodule(p) is not head}
    state = {k: v for k, v in model.state_dict().items()}
    schemes: dict[tuple, list[str]] = {}
    for path, qw in quantized.items():
        module = model.get_submodule(path)
        if is_conv1d(module) or not isinstance(module, torch.nn.Linear):
            raise ConfigError(f"{path}: compressed-tensors packs nn.Linear layers; got {type(module).__name__}")
        if tuple(module.weight.shape) != tuple(qw.codes.shape):
            raise ConfigError(f"{path}: codes of shape {tuple(qw.codes.shape)} do not fit a weight of shape "
                              f"{tuple(module.weight.shape)}")
        if check_weights:
            expected = qw.dequantize()
            gap = float((module.weight.detach().float() - expected).abs().max())
            if gap > 1e-5 * float(expected.abs().max()) + 1e-7:
                raise ConfigError(f"{path}: the model's weight differs from the de-quantized codes by up to {gap:.3g}; "
                                  "write the de-quantized weights into the model first")
        del state[f"{path}.weight"]
        tensors, key = _compressed(qw)
        state.update({f"{path}.{name}": value for name, value in tensors.items()})
        schemes.setdefault(key, []).append(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if schemes:
            _write_quantization_config(tmp / "config.json", schemes)
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _compressed(qw: "QuantizedWeight") -> tuple[dict, tuple]:
    """compressed-tensors tensors of one layer and its scheme key ``(bits, group_size, symmetric)``.

    compressed-tensors' GROUP strategy needs groups that tile the row; a row whose last
    group is partial (576 inputs in groups of 128) is stored in groups of
    ``gcd(group, in)`` (64), each repeating its group's scale: the same weights, exactly.
    Its codes are signed (``[-2**(b-1), 2**(b-1) - 1]``), so asymmetric codes and zero
    points shift down by ``2**(b-1)``; ``(code - zero) * scale`` is unchanged.
    """
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if not 1 <= qw.bits <= 8:
        raise ConfigError(f"compressed-tensors packs 1..8-bit weights; got {qw.bits} bits")
    out_features, k = qw.codes.shape
    group = qw.group_size if 0 < qw.group_size < k else 0
    stored = math.gcd(group, k) if group else 0
    columns = torch.arange(0, k, stored) // group if group else torch.zeros(1, dtype=torch.long)
    offset = 0 if qw.symmetric else 1 << (qw.bits - 1)
    tensors = {
        "weight_packed": pack_to_int32((qw.codes - offset).to(torch.int8), qw.bits),
        "weight_scale": qw.scale[:, columns].to(torch.float32).contiguous(),
        "weight_shape": torch.tensor([out_features, k]),
    }
    if not qw.symmetric:
        zero = (qw.zero_point[:, columns] - offset).to(torch.int8)
        tensors["weight_zero_point"] = pack_to_int32(zero, qw.bits, packed_dim=0).contiguous()
    return tensors, (qw.bits, stored, qw.symmetric)


def _write_quantization_config(config_path: Path, schemes: Mapping[tuple, list[str]]) -> None:
    """Add compressed-tensors' ``quantization_config`` (one config group per scheme) to config.json."""
    import compressed_tensors
    from compressed_tensors.base import (COMPRESSION_VERSION_NAME, QUANTIZATION_CONFIG_NAME, QUANTIZATION_METHOD,
                                         QUANTIZATION_METHOD_NAME, SPARSITY_CONFIG_NAME, TRANSFORM_CONFIG_NAME)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups = {}
    for i, ((bits, group, symmetric), targets) in enumerate(sorted(schemes.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="group" if group else "channel", group_size=group or None)
        groups[f"group_{i}"] = QuantizationScheme(targets=list(targets), weights=args)
    quant = QuantizationConfig(config_groups=groups, format=FORMAT, quantization_status="compressed")
    config = json.loads(config_path.read_text())
    config[QUANTIZATION_CONFIG_NAME] = {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__, QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: {}, TRANSFORM_CONFIG_NAME: {}, **quant.model_dump(exclude=["quant_method"]),
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def reload(path: PathLike) -> "nn.Module":
    """The model of a :func:`save_hf_folder` folder, loaded back with float weights, in eval mode.

    Symmetric folders load through ``AutoModelForCausalLM.from_pretrained``, as a user
    would. Asymmetric ones do not in transformers 5.25 with compressed-tensors 0.20.1
    (the loader expects unpacked zero points where the format packs them: a size
    mismatch), so their layers are decompressed here with compressed-tensors' own
    ``PackedQuantizationCompressor`` into a model built from the config.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    if any(not (g.get("weights") or {}).get("symmetric", True) for g in groups.values()):
        return _reload_decompressing(path, groups)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval()


def _reload_decompressing(path: Path, groups: Mapping[str, Any]) -> "nn.Module":
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    for group in groups.values():
        scheme = QuantizationScheme.model_validate(group)
        for target in scheme.targets:
            names = [n for n in list(state) if n.startswith(target + ".weight_")]
            local = {n[len(target) + 1:]: state.pop(n) for n in names}
            state[f"{target}.weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_head = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied_head:
        raise ConfigError(f"{path}: tensors do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()
