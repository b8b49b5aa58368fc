"""Packing integer weight codes into real bytes, and reading them back bit-exactly.

A ``bits``-bit code takes exactly ``bits`` bits in the stream, so a 4-bit tensor
takes half the bytes of an 8-bit one. The size a candidate reports is the length of
these bytes plus its scales and float parameters, not a formula.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from torch import nn


def pack_codes(codes: "np.ndarray", bits: int) -> bytes:
    """Pack signed integer codes (``|code| < 2**(bits-1)``) into a little-endian bit stream."""
    import numpy as np

    offset = 2 ** (bits - 1)
    unsigned = (codes.astype(np.int64).ravel() + offset).astype(np.uint32)
    bit_matrix = ((unsigned[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.ravel(), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> "np.ndarray":
    """The inverse of :func:`pack_codes`: ``count`` signed codes as int32."""
    import numpy as np

    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    bit_matrix = stream.reshape(count, bits).astype(np.uint32)
    unsigned = (bit_matrix << np.arange(bits, dtype=np.uint32)).sum(1)
    return (unsigned.astype(np.int64) - 2 ** (bits - 1)).astype(np.int32)


def packed_state(model: "nn.Module") -> dict[str, bytes]:
    """Every weight of ``model`` as the bytes a deployment would store.

    Quantized layers: packed codes plus float32 per-channel scales (and the input
    activation's scale and zero point). Everything else: float32 bytes.
    """
    import numpy as np

    from slimsearch.evaluators.quantize import quant_layers, quantize_weight_int
    from slimsearch.spaces.plan import FULL_PRECISION

    out: dict[str, bytes] = {}
    quantized = {id(m) for m in quant_layers(model)}
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        if id(module) in quantized and module.weight_bits < FULL_PRECISION:
            codes, scale = quantize_weight_int(module.weight.detach(), module.weight_bits)
            out[f"{name}.weight.codes"] = pack_codes(codes.numpy(), module.weight_bits)
            out[f"{name}.weight.scale"] = scale.numpy().astype(np.float32).tobytes()
            own.pop("weight")
        if id(module) in quantized and module.act_bits < FULL_PRECISION:
            out[f"{name}.act.qparams"] = np.array(
                [float(module.act_scale), float(module.act_zero_point)], dtype=np.float32
            ).tobytes()
        for pname, param in own.items():
            out[f"{name}.{pname}"] = param.detach().numpy().astype(np.float32).tobytes()
    return out


def packed_size(model: "nn.Module") -> int:
    """Bytes of :func:`packed_state`."""
    return sum(len(b) for b in packed_state(model).values())
