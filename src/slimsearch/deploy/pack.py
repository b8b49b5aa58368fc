"""Packing weights into the bytes a deployment stores, and reading them back bit-exactly.

A ``bits``-bit code takes exactly ``bits`` bits in the stream, so a 4-bit tensor
takes half the bytes of an 8-bit one. Scales are float32 per output channel, or
8-bit codes per group plus one float32 step per tensor; asymmetric grids add a
``bits``-bit zero point per channel or group. A sparse weight is stored in a sparse
format only when that is smaller than the dense codes: a bitmask of the nonzero
weights plus their codes (unstructured sparsity), or for 2:4 layers two 2-bit
positions plus two codes per group of four (the layout 2:4 kernels read). So
unstructured sparsity shrinks the bytes only once the bitmask pays for itself
(density below ``(bits - 1) / bits``). The size a candidate reports is the length of
these bytes plus its float parameters and buffers, not a formula.

Keys of :func:`packed_state` (``<layer>`` is the module name):

- ``<layer>.weight.codes``: dense codes; or ``.weight.mask`` + ``.weight.values``
  (bitmask format), or ``.weight.index`` + ``.weight.values`` (2:4 format);
- ``<layer>.weight.scale``: float32 scale per channel, or the float32 step of the
  per-group ``<layer>.weight.scale_codes`` (uint8);
- ``<layer>.weight.zero_point``: asymmetric grids only, unsigned ``bits``-bit codes;
- ``<layer>.act.qparams``: float32 input scale and zero point;
- ``<module>.<tensor>``: every other parameter and buffer, raw little-endian bytes
  (a float layer's sparse weight uses the mask/values keys with float32 values).
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

FLOAT_BITS = 32
NM_KEEP, NM_GROUP, NM_INDEX_BITS = 2, 4, 2


class WeightFormat(str, Enum):
    """How one weight tensor's codes (or float values) are laid out."""

    DENSE = "dense"  # every code, in order
    BITMASK = "bitmask"  # one bit per weight (nonzero?) + the nonzero codes
    NM = "2:4"  # per group of 4: two 2-bit positions + their two codes


def pack_codes(codes: "np.ndarray", bits: int, *, signed: bool = True) -> bytes:
    """Pack integer codes into a little-endian bit stream of ``bits`` bits each.

    Signed codes (``|code| < 2**(bits-1)``) are stored offset by ``2**(bits-1)``;
    unsigned codes (``0 <= code < 2**bits``) as they are.
    """
    import numpy as np

    offset = 2 ** (bits - 1) if signed else 0
    unsigned = (np.asarray(codes).astype(np.int64).ravel() + offset).astype(np.uint32)
    bit_matrix = ((unsigned[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.ravel(), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int, *, signed: bool = True) -> "np.ndarray":
    """The inverse of :func:`pack_codes`: ``count`` codes as int32."""
    import numpy as np

    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    bit_matrix = stream.reshape(count, bits).astype(np.uint32)
    unsigned = (bit_matrix << np.arange(bits, dtype=np.uint32)).sum(1, dtype=np.uint32)
    offset = 2 ** (bits - 1) if signed else 0
    return (unsigned.astype(np.int64) - offset).astype(np.int32)


def _pack_values(values: "np.ndarray", bits: int, signed: bool) -> bytes:
    import numpy as np

    if bits >= FLOAT_BITS:
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    return pack_codes(values, bits, signed=signed)


def _unpack_values(data: bytes, bits: int, count: int, signed: bool) -> "np.ndarray":
    import numpy as np

    if bits >= FLOAT_BITS:
        return np.frombuffer(data, dtype="<f4", count=count).copy()
    return unpack_codes(data, bits, count, signed=signed)


def _nbytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


# 2:4 groups run along the input channels of each kernel position (see quantize.nm_rows).
def _nm_groups(values: "np.ndarray", pad: "np.ndarray") -> "np.ndarray":
    import numpy as np

    rows = values.transpose(0, 2, 3, 1) if values.ndim == 4 else values
    rows = rows.reshape(values.shape[0], -1)
    k = rows.shape[1]
    n = math.ceil(k / NM_GROUP)
    if n * NM_GROUP != k:
        fill = np.broadcast_to(pad, (rows.shape[0], n * NM_GROUP - k))
        rows = np.concatenate([rows, fill.astype(rows.dtype)], axis=1)
    return rows.reshape(rows.shape[0], n, NM_GROUP)


def _from_nm_groups(groups: "np.ndarray", shape: tuple[int, ...]) -> "np.ndarray":
    rows = groups.reshape(shape[0], -1)
    if len(shape) == 4:
        out, cin, kh, kw = shape
        return rows[:, : kh * kw * cin].reshape(out, kh, kw, cin).transpose(0, 3, 1, 2)
    return rows[:, : math.prod(shape[1:])].reshape(shape)


def encode_weight(
    values: "np.ndarray", zero: "np.ndarray", bits: int, *, signed: bool = True, nm: bool = False
) -> dict[str, bytes]:
    """The smallest encoding of one weight tensor, as ``{suffix: bytes}``.

    Args:
        values: integer codes (``bits`` < 32) or float32 values (``bits`` = 32), in the weight's shape.
        zero: the code that stands for 0.0, broadcastable to ``values`` (the zero point).
        bits: code width; 32 for float values.
        signed: codes are signed (symmetric grid) or unsigned (asymmetric grid).
        nm: the weight is 2:4 sparse: try the 2:4 format (the layout 2:4 kernels read) instead of
            the bitmask; if some group of four holds more than two nonzeros, the bitmask is tried.

    Returns:
        ``{"codes": ...}`` (dense), ``{"mask": ..., "values": ...}`` or ``{"index": ..., "values": ...}``.
    """
    import numpy as np

    zero = np.broadcast_to(zero, values.shape)
    nonzero = values != zero
    count, nnz = values.size, int(nonzero.sum())
    sizes = {WeightFormat.DENSE: _nbytes(count, bits)}
    groups = _nm_groups(nonzero, np.zeros((), dtype=bool)) if nm and values.ndim >= 2 else None
    if groups is not None and int(groups.sum(-1).max(initial=0)) <= NM_KEEP:
        kept = groups.shape[0] * groups.shape[1] * NM_KEEP
        sizes[WeightFormat.NM] = _nbytes(kept, NM_INDEX_BITS) + _nbytes(kept, bits)
    else:
        sizes[WeightFormat.BITMASK] = _nbytes(count, 1) + _nbytes(nnz, bits)
    best = min(sizes, key=lambda f: (sizes[f], f is not WeightFormat.DENSE))
    if best is WeightFormat.DENSE:
        return {"codes": _pack_values(values, bits, signed)}
    if best is WeightFormat.BITMASK:
        mask = np.packbits(nonzero.ravel(), bitorder="little").tobytes()
        return {"mask": mask, "values": _pack_values(values[nonzero], bits, signed)}
    groups = _nm_groups(values, np.zeros((), dtype=values.dtype))
    zeros = _nm_groups(zero, np.zeros((), dtype=values.dtype))
    # the nonzero positions first, then the lowest zero ones, in ascending order
    key = (groups == zeros) * NM_GROUP + np.arange(NM_GROUP)
    index = np.sort(np.argsort(key, axis=-1, kind="stable")[..., :NM_KEEP], axis=-1)
    kept = np.take_along_axis(groups, index, axis=-1)
    return {"index": pack_codes(index, NM_INDEX_BITS, signed=False), "values": _pack_values(kept, bits, signed)}


def decode_weight(
    parts: Mapping[str, bytes], shape: tuple[int, ...], zero: "np.ndarray", bits: int, *, signed: bool = True
) -> "np.ndarray":
    """The inverse of :func:`encode_weight`: the codes (int32) or float32 values in ``shape``."""
    import numpy as np

    dtype = np.float32 if bits >= FLOAT_BITS else np.int32
    zero = np.broadcast_to(np.asarray(zero, dtype=dtype), shape)
    count = math.prod(shape)
    if "codes" in parts:
        return _unpack_values(parts["codes"], bits, count, signed).reshape(shape)
    if "mask" in parts:
        nonzero = np.unpackbits(np.frombuffer(parts["mask"], dtype=np.uint8), bitorder="little", count=count)
        nonzero = nonzero.astype(bool).reshape(shape)
        out = zero.copy()
        out[nonzero] = _unpack_values(parts["values"], bits, int(nonzero.sum()), signed)
        return out
    groups = _nm_groups(zero, np.zeros((), dtype=dtype)).copy()
    kept_shape = groups.shape[:-1] + (NM_KEEP,)
    kept = math.prod(kept_shape)
    index = unpack_codes(parts["index"], NM_INDEX_BITS, kept, signed=False).reshape(kept_shape)
    values = _unpack_values(parts["values"], bits, kept, signed).reshape(kept_shape)
    np.put_along_axis(groups, index.astype(np.int64), values, axis=-1)
    return np.ascontiguousarray(_from_nm_groups(groups, shape))


def expand_groups(per_group: "np.ndarray", shape: tuple[int, ...], group_size: int) -> "np.ndarray":
    """A ``(out, groups)`` array repeated over each group's input elements, in ``shape``."""
    import numpy as np

    row = math.prod(shape[1:])
    g = group_size or row
    return np.repeat(per_group, g, axis=1)[:, :row].reshape(shape)


def _own_tensors(module: "nn.Module") -> dict:
    """Parameters and persistent buffers of ``module`` itself (not of its children)."""
    own = dict(module.named_parameters(recurse=False))
    skip = getattr(module, "_non_persistent_buffers_set", set())
    own.update({k: b for k, b in module.named_buffers(recurse=False) if k not in skip and b is not None})
    return own


def layer_state(name: str, module: "nn.Module") -> dict[str, bytes]:
    """The packed bytes of one quantized layer (see the module docstring for the keys)."""
    import numpy as np

    prefix = f"{name}." if name else ""
    out: dict[str, bytes] = {}
    nm = getattr(module, "sparsity_pattern", None) == "2:4"
    weight = module.weight.detach()
    if module.weight_bits < FLOAT_BITS:
        qw = module.quantized_weight()
        shape = tuple(weight.shape)
        zero = expand_groups(qw.zero_point.detach().cpu().numpy(), shape, qw.group_size)
        parts = encode_weight(qw.codes.detach().cpu().numpy(), zero, qw.bits, signed=qw.symmetric, nm=nm)
        out.update({f"{prefix}weight.{k}": v for k, v in parts.items()})
        if qw.scale_step is None:
            out[f"{prefix}weight.scale"] = qw.scale[:, 0].detach().cpu().numpy().astype("<f4").tobytes()
        else:
            out[f"{prefix}weight.scale_codes"] = qw.scale_codes().detach().cpu().numpy().astype(np.uint8).tobytes()
            out[f"{prefix}weight.scale"] = qw.scale_step.reshape(1).detach().cpu().numpy().astype("<f4").tobytes()
        if not qw.symmetric:
            out[f"{prefix}weight.zero_point"] = pack_codes(qw.zero_point.detach().cpu().numpy(), qw.bits, signed=False)
    elif getattr(module, "weight_mask", None) is not None:
        values = (weight * module.weight_mask).detach().cpu().numpy().astype(np.float32)
        parts = encode_weight(values, np.zeros((), dtype=np.float32), FLOAT_BITS, nm=nm)
        if "codes" in parts:
            out[f"{prefix}weight"] = parts["codes"]
        else:
            out.update({f"{prefix}weight.{k}": v for k, v in parts.items()})
    else:
        out[f"{prefix}weight"] = _raw(weight)
    if module.act_bits < FLOAT_BITS:
        out[f"{prefix}act.qparams"] = np.array(
            [float(module.act_scale), float(module.act_zero_point)], dtype="<f4"
        ).tobytes()
    if module.bias is not None:
        out[f"{prefix}bias"] = _raw(module.bias.detach())
    return out


def _raw(tensor) -> bytes:
    """Little-endian bytes of a tensor in its own dtype."""
    array = tensor.detach().cpu().contiguous().numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def packed_state(model: "nn.Module") -> dict[str, bytes]:
    """Every weight and buffer of ``model`` as the bytes a deployment would store.

    Quantized layers: packed codes (dense or sparse, whichever is smaller), scales,
    zero points and the input activation's scale and zero point. Everything else:
    its own bytes (float32 for a float32 model).
    """
    from slimsearch.compress.quant.layers import quant_layers

    out: dict[str, bytes] = {}
    quantized = {id(m) for m in quant_layers(model)}
    for name, module in model.named_modules():
        if id(module) in quantized:
            out.update(layer_state(name, module))
            continue
        prefix = f"{name}." if name else ""
        for tname, tensor in _own_tensors(module).items():
            out[f"{prefix}{tname}"] = _raw(tensor)
    return out


def packed_size(model: "nn.Module") -> int:
    """Bytes of :func:`packed_state`."""
    return sum(len(b) for b in packed_state(model).values())
