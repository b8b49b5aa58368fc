"""The packed file: a compressed model's weights on disk, rebuilt bit-exactly.

:func:`save_packed` writes the bytes :func:`~slimsearch.deploy.pack.packed_state`
counts, behind a JSON header that describes every module; :func:`load_packed`
rebuilds the frozen model from it and an instance of the architecture (the
teacher will do: pruned layers are rebuilt at their recorded shapes), weight for
weight bit-exactly. Nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from slimsearch._io import atomic_path
from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "slimsearch-packed"
VERSION = 1
MAGIC = b"SLIMPACK"
_PREAMBLE = struct.Struct("<8sIQ")  # magic, version, header length

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- packed file


def _class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _layer_args(module: nn.Module) -> dict[str, Any] | None:
    """Constructor arguments of a Conv2d/Linear (or its quantized twin); None for other modules."""
    from torch import nn

    from slimsearch.compress.quant.layers import QConv2d, QLinear

    if type(module) in (nn.Conv2d, QConv2d):
        return {"kind": "conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
                "padding_mode": module.padding_mode}
    if type(module) in (nn.Linear, QLinear):
        return {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    return None


def _build_layer(args: dict[str, Any], quantized: bool) -> nn.Module:
    from torch import nn

    from slimsearch.compress.quant.layers import QConv2d, QLinear

    if args["kind"] == "conv2d":
        cls = QConv2d if quantized else nn.Conv2d
        padding = args["padding"] if isinstance(args["padding"], str) else tuple(args["padding"])
        return cls(args["in_channels"], args["out_channels"], tuple(args["kernel_size"]), stride=tuple(args["stride"]),
                   padding=padding, dilation=tuple(args["dilation"]), groups=args["groups"], bias=args["bias"],
                   padding_mode=args["padding_mode"])
    cls = QLinear if quantized else nn.Linear
    return cls(args["in_features"], args["out_features"], bias=args["bias"])


def _records(model: nn.Module) -> list[dict[str, Any]]:
    """One JSON-ready record per module: class, layer shape, quantization, tensor shapes."""
    from slimsearch.deploy.pack import _own_tensors
    from slimsearch.compress.quant.layers import quant_layers

    quantized = {id(m) for m in quant_layers(model)}
    records = []
    for name, module in model.named_modules():
        record: dict[str, Any] = {"name": name, "class": _class_path(module)}
        args = _layer_args(module)
        if args is not None:
            record["layer"] = args
        if id(module) in quantized:
            if args is None:
                raise ConfigError(f"layer {name!r}: cannot save a quantized {type(module).__name__}")
            record["quant"] = {
                "weight_bits": module.weight_bits, "act_bits": module.act_bits, "group_size": module.group_size,
                "symmetric": module.symmetric, "sparsity": module.sparsity,
                "sparsity_pattern": module.sparsity_pattern,
            }
        else:
            record["tensors"] = {key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                                 for key, t in _own_tensors(module).items()}
        records.append(record)
    return records


def save_packed(model: nn.Module, path: PathLike) -> int:
    """Write ``model``'s packed weights with a JSON header to ``path``; returns the bytes written.

    The payload is exactly :func:`~slimsearch.deploy.pack.packed_state`, so the
    file is ``packed_size(model)`` bytes plus the header.

    Raises:
        ConfigError: a quantized layer is not frozen (call ``freeze(model)`` first).
    """
    from slimsearch.deploy.pack import packed_state
    from slimsearch.compress.quant.layers import quant_layers

    loose = [name for name, m in model.named_modules() if m in quant_layers(model) and not m.frozen]
    if loose:
        raise ConfigError(f"save_packed needs a frozen model; layers {loose} are not frozen: call freeze(model) first")
    state = packed_state(model)
    blobs, offset = {}, 0
    for key, data in state.items():
        blobs[key] = [offset, len(data)]
        offset += len(data)
    header = json.dumps({"format": FORMAT, "version": VERSION, "modules": _records(model), "blobs": blobs},
                        sort_keys=True).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(_PREAMBLE.pack(MAGIC, VERSION, len(header)))
        fh.write(header)
        for data in state.values():
            fh.write(data)
    return _PREAMBLE.size + len(header) + offset


def read_packed(path: PathLike) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The header and the ``{key: bytes}`` payload of a file written by :func:`save_packed`."""
    data = Path(path).read_bytes()
    if len(data) < _PREAMBLE.size:
        raise ConfigError(f"{path}: not a slimsearch packed file (too short)")
    magic, version, length = _PREAMBLE.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ConfigError(f"{path}: not a slimsearch packed file of version {VERSION} "
                          f"(magic {magic!r}, version {version})")
    header = json.loads(data[_PREAMBLE.size : _PREAMBLE.size + length])
    payload = memoryview(data)[_PREAMBLE.size + length :]
    blobs = {key: bytes(payload[start : start + size]) for key, (start, size) in header["blobs"].items()}
    return header, blobs


def _tensor(data: bytes, spec: dict[str, Any]) -> torch.Tensor:
    import numpy as np
    import torch

    dtype = getattr(torch, spec["dtype"])
    np_dtype = torch.empty((), dtype=dtype).cpu().numpy().dtype.newbyteorder("<")
    return torch.from_numpy(np.frombuffer(data, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
                            .reshape(spec["shape"]))


def _quant_state(prefix: str, layer: nn.Module, blobs: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """The state dict entries of one quantized layer, decoded from its packed bytes."""
    import numpy as np
    import torch

    from slimsearch.deploy.pack import FLOAT_BITS, decode_weight, expand_groups, unpack_codes
    from slimsearch.compress.quant.grid import QuantizedWeight

    def parts(stem: str) -> dict[str, bytes]:
        return {key[len(stem) + 1 :]: data for key, data in blobs.items()
                if key.startswith(stem + ".") and key[len(stem) + 1 :] in ("codes", "mask", "values", "index")}

    state: dict[str, torch.Tensor] = {}
    shape = tuple(layer.weight.shape)
    if layer.weight_bits < FLOAT_BITS:
        bits, out = layer.weight_bits, shape[0]
        groups = layer.weight_scale.shape[1]
        step = None
        if f"{prefix}weight.scale_codes" in blobs:
            step = torch.from_numpy(np.frombuffer(blobs[f"{prefix}weight.scale"], dtype="<f4").astype(np.float32))[0]
            codes = np.frombuffer(blobs[f"{prefix}weight.scale_codes"], dtype=np.uint8).reshape(out, groups)
            scale = torch.from_numpy(codes.astype(np.float32)) * step
        else:
            scale = torch.from_numpy(np.frombuffer(blobs[f"{prefix}weight.scale"], dtype="<f4")
                                     .astype(np.float32).reshape(out, 1))
        if layer.symmetric:
            zero_point = np.zeros((out, groups), dtype=np.int32)
        else:
            zero_point = unpack_codes(blobs[f"{prefix}weight.zero_point"], bits, out * groups, signed=False)
            zero_point = zero_point.reshape(out, groups)
        zero = expand_groups(zero_point, shape, layer.group_size)
        codes = decode_weight(parts(f"{prefix}weight"), shape, zero, bits, signed=layer.symmetric)
        qw = QuantizedWeight(torch.from_numpy(codes), scale, torch.from_numpy(zero_point), step, bits,
                             layer.group_size, layer.symmetric)
        state[f"{prefix}weight"] = qw.dequantize()
        state[f"{prefix}weight_scale"] = scale
        state[f"{prefix}weight_zero_point"] = qw.zero_point
        if step is not None:
            state[f"{prefix}weight_scale_step"] = step
    elif f"{prefix}weight" in blobs:
        state[f"{prefix}weight"] = _tensor(blobs[f"{prefix}weight"], {"shape": list(shape), "dtype": "float32"})
    else:
        values = decode_weight(parts(f"{prefix}weight"), shape, np.zeros((), np.float32), FLOAT_BITS)
        state[f"{prefix}weight"] = torch.from_numpy(values)
    if layer.sparsity > 0:
        state[f"{prefix}weight_mask"] = state[f"{prefix}weight"] != 0
    qparams = np.frombuffer(blobs.get(f"{prefix}act.qparams", np.array([1, 0], "<f4").tobytes()), dtype="<f4")
    state[f"{prefix}act_scale"] = torch.tensor(float(qparams[0]))
    state[f"{prefix}act_zero_point"] = torch.tensor(int(qparams[1]), dtype=torch.int32)
    if layer.bias is not None:
        state[f"{prefix}bias"] = _tensor(blobs[f"{prefix}bias"], {"shape": [shape[0]], "dtype": "float32"})
    return state


def _instantiate(class_path: str, name: str) -> nn.Module:
    """A parameterless ``torch.nn`` module (Identity, ReLU, ...) named in a header."""
    import importlib

    from torch import nn

    module_path, _, qualname = class_path.rpartition(".")
    if not module_path.startswith("torch.nn."):
        raise ConfigError(f"module {name!r}: the architecture has no {class_path} here, and only parameterless "
                          "torch.nn modules are rebuilt from the header")
    cls = getattr(importlib.import_module(module_path), qualname, None)
    try:
        module = cls()
    except TypeError:
        module = None
    if not isinstance(module, nn.Module) or any(True for _ in module.parameters()):
        raise ConfigError(f"module {name!r}: cannot rebuild {class_path} without arguments")
    return module


def load_packed(path: PathLike, template_model: nn.Module) -> nn.Module:
    """Rebuild the frozen model saved by :func:`save_packed`.

    Args:
        path: the packed file.
        template_model: the architecture, e.g. the teacher (not changed). Conv2d and
            Linear layers are rebuilt at their saved shapes and bit-widths, other
            modules' tensors are resized to the saved shapes, and modules the
            compressed model replaced by parameterless ones (``nn.Identity`` for a
            folded BatchNorm or a dropped block) are replaced likewise.

    Returns:
        The model in eval mode, its state dict equal to the saved model's.
    """
    import torch
    from torch import nn

    from slimsearch.compress.quant.layers import quant_layers, set_module

    header, blobs = read_packed(path)
    if header.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {header.get('format')!r} is not {FORMAT!r}")
    model = copy.deepcopy(template_model)
    state: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()  # modules not the template's own
    for record in header["modules"]:
        name = record["name"]
        try:
            current = model.get_submodule(name)
        except AttributeError:  # a child of a module the compressed model put in (a low-rank layer's factor)
            if name.rpartition(".")[0] not in replaced:
                raise ConfigError(f"{path}: module {name!r} is not in the template architecture") from None
            current = None
        module = current
        if "layer" in record:
            module = _build_layer(record["layer"], "quant" in record)
            if "quant" in record:
                module._setup(**record["quant"])
        elif current is None or _class_path(current) != record["class"]:
            module = _instantiate(record["class"], name)
        if module is not current:
            replaced.add(name)
            if name:
                set_module(model, name, module)
            else:
                model = module
        prefix = f"{name}." if name else ""
        if "quant" in record:
            state.update(_quant_state(prefix, module, blobs))
            continue
        for key, spec in record.get("tensors", {}).items():
            tensor = _tensor(blobs[prefix + key], spec)
            if key in module._parameters:
                module._parameters[key] = nn.Parameter(torch.empty_like(tensor),
                                                       requires_grad=tensor.is_floating_point())
            else:
                module._buffers[key] = torch.empty_like(tensor)
            state[prefix + key] = tensor
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{path}: the template architecture does not match the saved model: {exc}") from None
    for layer in quant_layers(model):
        layer.frozen = True
    return model.eval()
