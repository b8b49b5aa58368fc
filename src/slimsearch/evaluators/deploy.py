"""Deployable forms of a compressed model: packed weights on disk and an int8 ONNX graph.

:func:`save_packed` writes the bytes :func:`~slimsearch.evaluators.pack.packed_state`
counts, behind a JSON header that describes every module; :func:`load_packed`
rebuilds the frozen model from it and an instance of the architecture (the
teacher will do: pruned layers are rebuilt at their recorded shapes), weight for
weight bit-exactly. Nothing is unpickled.

:func:`onnx_qdq_bytes` turns a model whose quantized layers are all W8A8 into a QDQ
graph with int8 weight initializers, which onnxruntime's QDQ transformer runs
with integer kernels (QLinearConv, QGemm, ...).
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    import numpy as np
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

    from slimsearch.evaluators.quantize import QConv2d, QLinear

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

    from slimsearch.evaluators.quantize import QConv2d, QLinear

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
    from slimsearch.evaluators.pack import _own_tensors
    from slimsearch.evaluators.quantize import quant_layers

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

    The payload is exactly :func:`~slimsearch.evaluators.pack.packed_state`, so the
    file is ``packed_size(model)`` bytes plus the header.

    Raises:
        ConfigError: a quantized layer is not frozen (call ``freeze(model)`` first).
    """
    from slimsearch.evaluators.pack import packed_state
    from slimsearch.evaluators.quantize import quant_layers

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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(_PREAMBLE.pack(MAGIC, VERSION, len(header)))
        fh.write(header)
        for data in state.values():
            fh.write(data)
    os.replace(tmp, path)
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
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype.newbyteorder("<")
    return torch.from_numpy(np.frombuffer(data, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
                            .reshape(spec["shape"]))


def _quant_state(prefix: str, layer: nn.Module, blobs: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """The state dict entries of one quantized layer, decoded from its packed bytes."""
    import numpy as np
    import torch

    from slimsearch.evaluators.pack import FLOAT_BITS, decode_weight, expand_groups, unpack_codes
    from slimsearch.evaluators.quantize import QuantizedWeight

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

    from slimsearch.evaluators.quantize import quant_layers

    header, blobs = read_packed(path)
    if header.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {header.get('format')!r} is not {FORMAT!r}")
    model = copy.deepcopy(template_model)
    state: dict[str, torch.Tensor] = {}
    for record in header["modules"]:
        name = record["name"]
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{path}: module {name!r} is not in the template architecture") from None
        module = current
        if "layer" in record:
            module = _build_layer(record["layer"], "quant" in record)
            if "quant" in record:
                module._setup(**record["quant"])
        elif _class_path(current) != record["class"]:
            module = _instantiate(record["class"], name)
        if module is not current:
            if name:
                model.set_submodule(name, module)
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


# --------------------------------------------------------------------------- int8 ONNX

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
# Ops between a layer's output and the next layer's input quantization that a uint8
# grid passes through unchanged, so the QuantizeLinear can move up to the layer's output.
GRID_PRESERVING_OPS = ("Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def qdq_blockers(model: nn.Module) -> list[str]:
    """Why ``model`` cannot become an int8 QDQ graph (empty when it can).

    Every quantized layer must be frozen with 8-bit symmetric per-channel weights and
    8-bit inputs, the grid onnxruntime's integer kernels take.
    """
    from slimsearch.evaluators.quantize import quant_layers

    layers = {id(m) for m in quant_layers(model)}
    if not layers:
        return ["no layer is quantized"]
    out = []
    for name, m in model.named_modules():
        if id(m) not in layers:
            continue
        why = []
        if m.weight_bits != 8:
            why.append(f"weight_bits={m.weight_bits}")
        if m.act_bits != 8:
            why.append(f"act_bits={m.act_bits}")
        if m.group_size:
            why.append(f"group_size={m.group_size}")
        if not m.symmetric:
            why.append("asymmetric weights")
        if not m.frozen:
            why.append("not frozen")
        if why:
            out.append(f"{name}: {', '.join(why)}")
    return out


class _Graph:
    """Lookups over an ONNX graph being rewritten."""

    def __init__(self, model) -> None:
        self.model = model
        self.graph = model.graph

    def initializers(self) -> dict:
        return {i.name: i for i in self.graph.initializer}

    def producers(self) -> dict:
        return {out: node for node in self.graph.node for out in node.output}

    def consumers(self) -> dict[str, list]:
        found: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                found.setdefault(name, []).append(node)
        return found

    def constant(self, name: str) -> "np.ndarray | None":
        """The value of an initializer, following Identity nodes; None for computed tensors."""
        from onnx import numpy_helper

        producers, inits = self.producers(), self.initializers()
        while name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        return numpy_helper.to_array(inits[name]) if name in inits else None


def _match_layer(weight: "np.ndarray", layers: list) -> tuple[Any, bool] | None:
    """The quantized layer whose frozen weight is ``weight`` (or its transpose)."""
    import numpy as np

    for layer in layers:
        w = layer.weight.detach().numpy()
        if w.shape == weight.shape and np.array_equal(w, weight):
            return layer, False
        if w.ndim == 2 and w.T.shape == weight.shape and np.array_equal(w.T, weight):
            return layer, True
    return None


def _quantize_weights(g: _Graph, layers: list) -> None:
    """Replace each quantized layer's float weight by int8 codes + DequantizeLinear (and its bias by int32)."""
    import numpy as np
    from onnx import helper, numpy_helper

    new_nodes, new_inits, matched = [], [], set()
    producers = g.producers()
    for index, node in enumerate(g.graph.node):
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        weight = g.constant(node.input[1])
        found = None if weight is None else _match_layer(weight, layers)
        if found is None:
            continue
        layer, transposed = found
        if node.op_type == "Gemm":
            # Gemm computes A @ B.T with transB=1: B must be the weight itself, else its transpose
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            if bool(trans_b) == transposed:
                continue
        elif transposed != (node.op_type == "MatMul"):
            continue
        matched.add(id(layer))
        qw = layer.quantized_weight()
        codes = qw.codes.numpy()
        scale = qw.scale[:, 0].numpy().astype(np.float32)
        # an all-zero channel may take any scale; 1 keeps its int32 bias representable
        scale = np.where(np.abs(codes.reshape(len(codes), -1)).max(1) == 0, np.float32(1.0), scale)
        axis = 1 if transposed else 0
        if transposed:
            codes = codes.T
        base = f"qdq{index}_{node.op_type}"
        new_inits += [numpy_helper.from_array(codes.astype(np.int8), f"{base}_w_q"),
                      numpy_helper.from_array(scale, f"{base}_w_scale"),
                      numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{base}_w_zero")]
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_w_q", f"{base}_w_scale", f"{base}_w_zero"],
                                          [f"{base}_w"], name=f"{base}_w_dq", axis=axis))
        node.input[1] = f"{base}_w"
        source = producers.get(node.input[0])
        bias = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        act_scale = g.constant(source.input[1]) if source is not None and source.op_type == "DequantizeLinear" else None
        if bias is None or act_scale is None or bias.ndim != 1:
            continue
        bias_scale = (np.float32(act_scale) * scale).astype(np.float32)
        bias_q = np.round(bias.astype(np.float64) / bias_scale)
        if np.abs(bias_q).max(initial=0) >= 2**31 - 1:
            continue  # the bias stays float: onnxruntime then runs this layer in float
        new_inits += [numpy_helper.from_array(bias_q.astype(np.int32), f"{base}_b_q"),
                      numpy_helper.from_array(bias_scale, f"{base}_b_scale"),
                      numpy_helper.from_array(np.zeros(len(bias_q), dtype=np.int32), f"{base}_b_zero")]
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_b_q", f"{base}_b_scale", f"{base}_b_zero"],
                                          [f"{base}_b"], name=f"{base}_b_dq", axis=0))
        node.input[2] = f"{base}_b"
    missing = [type(layer).__name__ for layer in layers if id(layer) not in matched]
    if missing:
        raise ConfigError(f"{len(missing)} quantized layer(s) have no float weight initializer in the exported "
                          "graph to replace; cannot build the int8 graph")
    g.graph.initializer.extend(new_inits)
    nodes = new_nodes + list(g.graph.node)
    del g.graph.node[:]
    g.graph.node.extend(nodes)


def _hoist_activation_qdq(g: _Graph) -> None:
    """Quantize each layer's output on the next layer's input grid, right where it is produced.

    ``Conv -> Relu -> Flatten -> Q -> DQ -> Gemm`` becomes ``Conv -> Q -> DQ -> Relu ->
    Flatten -> Q -> DQ -> Gemm``: the same numbers (the ops between keep values on
    the grid, so the second Q changes nothing), but now the Conv has an output Q and
    onnxruntime fuses it into QLinearConv.
    """
    from onnx import helper

    producers, consumers = g.producers(), g.consumers()
    position = {out: i for i, node in enumerate(g.graph.node) for out in node.output}
    hoisted: dict[str, list[str]] = {}  # layer output -> the Q's scale and zero point
    for q in g.graph.node:
        if q.op_type != "QuantizeLinear":
            continue
        name, chain = q.input[0], 0
        node = producers.get(name)
        while node is not None and node.op_type in GRID_PRESERVING_OPS and len(consumers.get(name, [])) == 1:
            name, chain = node.input[0], chain + 1
            node = producers.get(name)
        if node is None or node.op_type not in WEIGHT_OPS or chain == 0 or len(consumers.get(name, [])) != 1:
            continue
        hoisted[name] = list(q.input[1:])
    if not hoisted:
        return
    # protobuf copies nodes on extend: rewire in place first, then rebuild the list once
    for node in g.graph.node:
        for i, value in enumerate(node.input):
            if value in hoisted:
                node.input[i] = f"{value}_hoisted_dq"
    after: dict[int, list] = {}
    for name, qparams in hoisted.items():
        q_out, dq_out = f"{name}_hoisted_q", f"{name}_hoisted_dq"
        after[position[name]] = [
            helper.make_node("QuantizeLinear", [name, *qparams], [q_out], name=f"{q_out}_node"),
            helper.make_node("DequantizeLinear", [q_out, *qparams], [dq_out], name=f"{dq_out}_node"),
        ]
    nodes = []
    for i, node in enumerate(g.graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del g.graph.node[:]
    g.graph.node.extend(nodes)


def _drop_unused(g: _Graph) -> None:
    """Remove Identity nodes and initializers nothing reads any more."""
    outputs = {o.name for o in g.graph.output}
    while True:
        used = {name for node in g.graph.node for name in node.input} | outputs
        dead = [n for n in g.graph.node if n.op_type == "Identity" and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            g.graph.node.remove(node)
    used = {name for node in g.graph.node for name in node.input} | outputs
    keep = [i for i in g.graph.initializer if i.name in used]
    del g.graph.initializer[:]
    g.graph.initializer.extend(keep)


def onnx_qdq_bytes(model: nn.Module, example_input: torch.Tensor) -> bytes:
    """An ONNX QDQ graph of a W8A8 model: int8 weights and quantized activations.

    Each quantized layer's float weight becomes int8 codes with per-channel scales
    (``DequantizeLinear``, axis 0) and its bias int32 codes on the input scale times
    the weight scale; activations keep the calibrated uint8 QuantizeLinear /
    DequantizeLinear pairs. onnxruntime's QDQ transformer fuses these into integer
    kernels. Outputs agree with the PyTorch model up to the rounding of the bias.

    Raises:
        ConfigError: some quantized layer is not W8A8 symmetric per-channel (see :func:`qdq_blockers`).
    """
    import onnx

    from slimsearch.evaluators.onnx_graph import onnx_bytes
    from slimsearch.evaluators.quantize import quant_layers

    blockers = qdq_blockers(model)
    if blockers:
        raise ConfigError("an int8 ONNX graph needs every quantized layer frozen at 8-bit symmetric per-channel "
                          f"weights and 8-bit inputs; not so: {'; '.join(blockers)}")
    g = _Graph(onnx.load_from_string(onnx_bytes(model, example_input)))
    _quantize_weights(g, quant_layers(model))
    _hoist_activation_qdq(g)
    _drop_unused(g)
    onnx.checker.check_model(g.model)
    return g.model.SerializeToString()


def deployable_onnx_bytes(model: nn.Module, example_input: torch.Tensor) -> bytes:
    """The graph to ship and time: :func:`onnx_qdq_bytes` when the model is W8A8, else the float/QDQ graph."""
    from slimsearch.evaluators.onnx_graph import onnx_bytes

    if qdq_blockers(model):
        return onnx_bytes(model, example_input)
    return onnx_qdq_bytes(model, example_input)
