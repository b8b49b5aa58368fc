"""A decoder LLM as an ONNX Runtime GenAI folder, its quantized linears as MatMulNBits.

:func:`build_onnx` writes the float32 graph with a KV cache through the onnxruntime-genai
model builder; :func:`to_matmul_nbits` then replaces the MatMul of every quantized linear
by a ``com.microsoft`` MatMulNBits node holding *our* codes and scales bit for bit (the
builder's own int4 mode would re-quantize with RTN, losing what GPTQ/AWQ chose), and
:func:`to_w8a8` turns a (SmoothQuant-smoothed) float graph into int8 integer kernels.

MatMulNBits in onnxruntime 1.32 (CPU) runs 2-, 4- and 8-bit codes, ``block_size`` a power
of two >= 16 (<= 256 for 2 bits), ``B`` as uint8 ``[N, blocks, block * bits / 8]`` with the
codes packed low bits first along K, ``scales`` float ``[N, blocks]``, optional
``zero_points`` uint8 ``[N * ceil(blocks * bits / 8)]`` packed the same way (default
``2**(bits-1)``). Codes of other widths run in the next wider kernel: 3-bit codes in the
4-bit kernel, 5..7-bit codes in the 8-bit one (the bytes a profile counts for them are
the packed bytes of their own width; that count lives with the packing code, not here).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

from slimsearch.deploy.genai_folder import (
    GENAI_CONFIG,
    LM_HEAD_WEIGHT,
    MODEL_FILE,
    MS_DOMAIN,
    WEIGHT_SUFFIX,
    PathLike,
    check_graph_weight,
    linear_codes,
    new_folder,
    save_folder,
)
from slimsearch.exceptions import ConfigError, UnsupportedArchitecture

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from slimsearch.compress.quant.grid import QuantizedWeight

KERNEL_BITS = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}  # code width -> MatMulNBits kernel width
PER_CHANNEL_BLOCK = 128  # block of a per-channel weight; its one scale repeats in every block
MAX_BLOCK = 256  # the 2-bit kernel's limit, kept for every width so that one rule holds


@dataclass(frozen=True)
class NBitsReport:
    """What :func:`to_matmul_nbits` did.

    Attributes:
        path: the folder holding the rewritten graph.
        replaced: ONNX node names now MatMulNBits, in graph order.
        left_float: MatMul nodes whose weights stay float32.
        kernel_bits: ONNX weight name -> kernel width it runs in.
        block_size: ONNX weight name -> MatMulNBits block size.
        embedding: how a tied input embedding reads the quantized output projection
            (``"GatherBlockQuantized"``, ``"float"``) or ``None`` when untouched.
    """

    path: Path
    replaced: tuple[str, ...]
    left_float: tuple[str, ...]
    kernel_bits: dict
    block_size: dict
    embedding: Optional[str]


def build_onnx(hf_folder: PathLike, out_dir: PathLike, *, threads: int = 1) -> Path:
    """Float32 ONNX decoder with a KV cache, and its ``genai_config.json``, in ``out_dir``.

    Uses the onnxruntime-genai model builder rather than a torch export of our own: it
    is the field's tool that writes the KV-cache graph (GroupQueryAttention, fused
    q/k/v, skip-norms) and the genai_config that ORT GenAI serves. Its per-tensor
    progress output is swallowed; the session's intra-op thread count is set to
    ``threads`` so that timings compare at one thread count.
    """
    hf_folder, out_dir = Path(hf_folder), Path(out_dir)
    if not (hf_folder / "config.json").is_file():
        raise ConfigError(f"build_onnx: {hf_folder} has no config.json; give a Hugging Face model folder")
    if not any((hf_folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(f"build_onnx: {hf_folder} has no tokenizer; the builder copies it into the GenAI folder, "
                          "so save the tokenizer beside the model")
    if int(threads) < 1:
        raise ConfigError(f"threads must be an int >= 1, got {threads!r}")
    architecture = (json.loads((hf_folder / "config.json").read_text()).get("architectures") or ["?"])[0]
    from onnxruntime_genai.models import builder

    with new_folder(hf_folder, out_dir, replace=False, copy=False) as tmp:
        cache = tmp / ".builder_cache"
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                options = builder.parse_extra_options(hf_folder.name, str(hf_folder), str(tmp), "fp32", "cpu",
                                                      str(cache), [])
                builder.create_model(hf_folder.name, str(hf_folder), str(tmp), "fp32", "cpu", str(cache), **options)
        except NotImplementedError:
            raise UnsupportedArchitecture(f"build_onnx: architecture {architecture} is not supported by the onnxruntime-genai "
                              "model builder (LlamaForCausalLM, MistralForCausalLM, Qwen2/3, Phi3 and others are; "
                              "GPT-2 is not)") from None
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        set_threads(tmp, threads)
    return out_dir


def export_genai(model: "nn.Module", tokenizer, out_dir: PathLike, *,
                 quantized: Optional[Mapping[str, "QuantizedWeight"]] = None,
                 lm_head: Optional["QuantizedWeight"] = None, accuracy_level: int = 4, threads: int = 1) -> Path:
    """``model`` (holding de-quantized weights) as a GenAI folder: :func:`build_onnx` of its float
    weights, then :func:`to_matmul_nbits` with ``quantized`` and ``lm_head`` when given."""
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        model.save_pretrained(Path(tmp) / "hf")
        tokenizer.save_pretrained(Path(tmp) / "hf")
        if not quantized and lm_head is None:
            return build_onnx(Path(tmp) / "hf", out_dir, threads=threads)
        build_onnx(Path(tmp) / "hf", Path(tmp) / "float", threads=threads)
        return to_matmul_nbits(Path(tmp) / "float", quantized or {}, out_dir=out_dir, accuracy_level=accuracy_level,
                               lm_head=lm_head).path


def set_threads(onnx_dir: PathLike, threads: int) -> None:
    """Write ``session_options.intra_op_num_threads`` (and one inter-op thread) into genai_config.json."""
    if int(threads) < 1:
        raise ConfigError(f"threads must be an int >= 1, got {threads!r}")
    path = Path(onnx_dir) / GENAI_CONFIG
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = int(threads)
    options["inter_op_num_threads"] = 1
    path.write_text(json.dumps(config, indent=4))


def block_size_for(k: int, group_size: int, bits: int) -> int:
    """The MatMulNBits block that holds a ``group_size`` grid exactly along ``k`` inputs.

    A group of a power-of-two size >= 16 is one block; another group size is split into
    equal blocks of its largest power-of-two divisor (each repeating the group's scale
    and zero point), which must be >= 16. A per-channel weight (``group_size`` 0) uses
    blocks of :data:`PER_CHANNEL_BLOCK`, or one block of the next power of two when K is
    smaller, all with the channel's one scale.
    """
    if group_size == 0 or group_size >= k:
        return min(PER_CHANNEL_BLOCK, max(16, 1 << (k - 1).bit_length()))
    block = min(group_size & -group_size, MAX_BLOCK)
    if block < 16:
        raise ConfigError(f"group_size {group_size} has no power-of-two divisor >= 16, the smallest MatMulNBits "
                          f"block; allowed: group sizes that are multiples of 16 (or 0, per channel)")
    return block


def pack_matmul_nbits(qw: "QuantizedWeight") -> dict:
    """``B``, ``scales``, ``zero_points`` (None when symmetric) and attributes of MatMulNBits for ``qw``.

    Symmetric codes shift by the kernel's default zero point ``2**(kbits-1)``, so no
    zero-point tensor is stored; asymmetric ones keep theirs. The codes are ours,
    unchanged: the node computes exactly ``(codes - zero_point) * scale`` of ``qw``.
    """
    import numpy as np

    if qw.bits not in KERNEL_BITS:
        raise ConfigError(f"weight bits {qw.bits} have no MatMulNBits kernel; allowed: {sorted(KERNEL_BITS)}")
    kbits = KERNEL_BITS[qw.bits]
    codes = qw.codes.reshape(qw.codes.shape[0], -1).detach().cpu().numpy().astype(np.int64)
    n, k = codes.shape
    group = qw.group_size if 0 < qw.group_size < k else k
    block = block_size_for(k, qw.group_size, kbits)
    blocks = math.ceil(k / block)
    group_of_block = np.minimum(np.arange(blocks) * block // group, qw.scale.shape[1] - 1)
    scales = qw.scale.detach().cpu().numpy().astype(np.float32)[:, group_of_block]
    if qw.symmetric:
        unsigned = codes + (1 << (kbits - 1))
        zero = None
    else:
        unsigned = codes
        zero = qw.zero_point.detach().cpu().numpy().astype(np.int64)[:, group_of_block]
    if unsigned.min() < 0 or unsigned.max() >= (1 << kbits):
        raise ConfigError(f"codes span [{int(codes.min())}, {int(codes.max())}], outside a {qw.bits}-bit grid")
    padded = np.zeros((n, blocks * block), np.int64)
    padded[:, :k] = unsigned
    return {
        "B": _pack_low_first(padded.reshape(n, blocks, block), kbits),
        "scales": np.ascontiguousarray(scales),
        "zero_points": None if zero is None else _pack_low_first(zero[:, None, :], kbits).reshape(-1),
        "K": k, "N": n, "bits": kbits, "block_size": block,
    }


def _pack_low_first(values: "np.ndarray", bits: int) -> "np.ndarray":
    """Unsigned ``bits``-bit values, last axis packed ``8 // bits`` to a byte, low bits first."""
    import numpy as np

    per = 8 // bits
    pad = (-values.shape[-1]) % per
    if pad:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (pad,), values.dtype)], axis=-1)
    grouped = values.reshape(values.shape[:-1] + (values.shape[-1] // per, per)).astype(np.uint8)
    out = np.zeros(grouped.shape[:-1], np.uint8)
    for j in range(per):
        out |= grouped[..., j] << np.uint8(bits * j)
    return out


def to_matmul_nbits(onnx_dir: PathLike, quantized: Mapping[str, "QuantizedWeight"], *,
                    out_dir: Optional[PathLike] = None, accuracy_level: int = 4,
                    lm_head: Optional["QuantizedWeight"] = None, check_weights: bool = True) -> NBitsReport:
    """Replace the MatMul of every linear in ``quantized`` (torch module path -> codes) by MatMulNBits.

    ``onnx_dir`` is a :func:`build_onnx` folder of the model holding the de-quantized
    weights; with ``check_weights`` each replaced float weight must equal the de-quantized
    codes (which catches a graph built from another model, or q/k/v in another order).
    ``lm_head`` quantizes the output projection too (see
    :func:`~slimsearch.compress.output_head.quantize_output_projection`); a tied input embedding
    then reads the same packed bytes through GatherBlockQuantized when the kernel has 4 or 8 bits
    and the blocks tile the hidden size, else a float table.
    ``accuracy_level`` 4 lets the kernel quantize activations to int8 (fastest on CPU);
    0 computes in float32 (exact, for checks: on SmolLM2-135M it decoded 2x slower with
    4-bit weights and 15x slower with an 8-bit lm_head, whose level-0 kernel de-quantizes). The result goes to ``out_dir``, or replaces ``onnx_dir``.
    """
    import onnx
    from onnx import helper, numpy_helper

    src = Path(onnx_dir)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level must be one of [0, 1, 2, 3, 4], got {accuracy_level!r}")
    model = onnx.load(str(src / MODEL_FILE))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    unused = set(quantized)
    new_nodes, replaced, left_float, kbits, blocks = [], [], [], {}, {}
    embedding = None
    packed_by_weight = {}
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        if weight not in inits or not weight.endswith(WEIGHT_SUFFIX):
            new_nodes.append(node)
            continue
        if weight == LM_HEAD_WEIGHT:
            qw = lm_head
        else:
            qw, paths = linear_codes(weight, quantized)
            unused.difference_update(paths)
        if qw is None:
            new_nodes.append(node)
            left_float.append(node.name)
            continue
        graph_weight = numpy_helper.to_array(inits[weight])
        check_graph_weight(weight, graph_weight, qw, values=check_weights)
        packed = pack_matmul_nbits(qw)
        stem = weight[: -len(".weight")]
        names = [node.input[0], f"{stem}.weight_Q{packed['bits']}", f"{stem}.weight_scales"]
        graph.initializer.extend([numpy_helper.from_array(packed["B"], names[1]),
                                  numpy_helper.from_array(packed["scales"], names[2])])
        if packed["zero_points"] is not None:
            names.append(f"{stem}.weight_zero_points")
            graph.initializer.append(numpy_helper.from_array(packed["zero_points"], names[3]))
        new_nodes.append(helper.make_node(
            "MatMulNBits", names, list(node.output), name=f"{node.name}_Q{packed['bits']}", domain=MS_DOMAIN,
            K=packed["K"], N=packed["N"], bits=packed["bits"], block_size=packed["block_size"],
            accuracy_level=int(accuracy_level)))
        replaced.append(new_nodes[-1].name)
        kbits[weight], blocks[weight] = packed["bits"], packed["block_size"]
        packed_by_weight[weight] = (names, packed, qw)
    if unused:
        raise ConfigError(f"quantized linears not found in {src / MODEL_FILE}: {sorted(unused)[:4]} "
                          f"({len(unused)} in all); the graph names linears as model.layers.N.attn.qkv_proj, ...")
    if lm_head is not None and LM_HEAD_WEIGHT not in packed_by_weight:
        raise ConfigError(f"lm_head given but {src / MODEL_FILE} has no lm_head.MatMul with a float weight")
    if LM_HEAD_WEIGHT in packed_by_weight:
        embedding = _requantize_tied_embedding(graph, new_nodes, users, packed_by_weight[LM_HEAD_WEIGHT])
    del graph.node[:]
    graph.node.extend(new_nodes)
    still_read = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    path = save_folder(model, src, out_dir)
    return NBitsReport(path, tuple(replaced), tuple(left_float), kbits, blocks, embedding)


def _requantize_tied_embedding(graph, nodes: list, users: dict, head) -> Optional[str]:
    """A tied embedding (``Gather(Transpose(lm_head.MatMul.weight))``, as the builder writes it)
    re-pointed at the quantized output projection; None when the embedding is not tied."""
    import numpy as np
    from onnx import helper, numpy_helper

    (names, packed, qw) = head
    transposes = [n for n in users.get(LM_HEAD_WEIGHT, []) if n.op_type == "Transpose"]
    if not transposes:
        return None
    transpose = transposes[0]
    gathers = [n for n in nodes if n.op_type == "Gather" and n.input and n.input[0] == transpose.output[0]]
    nodes.remove(transpose)
    n, k, block = packed["N"], packed["K"], packed["block_size"]
    if packed["bits"] in (4, 8) and k % block == 0:
        shape_name = "lm_head.MatMul.weight_Q_shape"
        graph.initializer.append(numpy_helper.from_array(np.array([n, -1], np.int64), shape_name))
        flat = transpose.output[0] + "_packed"
        at = nodes.index(gathers[0])
        nodes.insert(at, helper.make_node("Reshape", [names[1], shape_name], [flat], name=transpose.name + "_Reshape"))
        for gather in gathers:
            inputs = [flat, gather.input[1], names[2]] + (names[3:] if len(names) > 3 else [])
            nodes[nodes.index(gather)] = helper.make_node(
                "GatherBlockQuantized", inputs, list(gather.output), name=gather.name + "BlockQuantized",
                domain=MS_DOMAIN, bits=packed["bits"], block_size=block, gather_axis=0, quantize_axis=1)
        if len(names) > 3:  # GatherBlockQuantized takes zero points shaped [N, packed blocks]
            zp = next(t for t in graph.initializer if t.name == names[3])
            zp.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(zp).reshape(n, -1), names[3]))
        return "GatherBlockQuantized"
    table = "model.embed_tokens.weight_dequantized"
    graph.initializer.append(numpy_helper.from_array(qw.dequantize().detach().cpu().numpy().astype(np.float32), table))
    for gather in gathers:
        gather.input[0] = table
    return "float"


def __getattr__(name: str):
    """``to_w8a8`` and ``W8A8Report`` moved to :mod:`.onnx_w8a8`; they forward from here for one release."""
    if name in ("to_w8a8", "W8A8Report"):
        import warnings

        from slimsearch.deploy import onnx_w8a8

        warnings.warn(f"slimsearch.deploy.onnx_nbits.{name} moved to slimsearch.deploy.onnx_w8a8.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(onnx_w8a8, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
