"""An ONNX Runtime GenAI folder: its files, how it is written whole, and how the builder's
graph names the torch linears (shared by :mod:`.onnx_nbits` and :mod:`.onnx_w8a8`)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Union

from slimsearch.exceptions import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from slimsearch.compress.quant.grid import QuantizedWeight

PathLike = Union[str, "os.PathLike[str]"]
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
WEIGHT_SUFFIX = ".MatMul.weight"  # the builder's name of a linear's (in, out) float weight
LM_HEAD_WEIGHT = "lm_head" + WEIGHT_SUFFIX
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators


def concat_out(parts: list) -> "QuantizedWeight":
    """q, k and v weights as one, stacked along their outputs (the builder's fused qkv_proj)."""
    import torch

    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.symmetric) != (first.bits, first.group_size, first.symmetric):
            raise ConfigError("fused q/k/v weights must share bits, group size and symmetry; got "
                              f"{[(q.bits, q.group_size, q.symmetric) for q in parts]}")
    return first._replace(codes=torch.cat([p.codes for p in parts]), scale=torch.cat([p.scale for p in parts]),
                          zero_point=torch.cat([p.zero_point for p in parts]), scale_step=None)


def torch_paths(weight: str) -> list[tuple[str, ...]]:
    """Candidate torch module paths of a builder weight name (``model.layers.0.attn.qkv_proj.MatMul.weight``)."""
    base = weight[: -len(WEIGHT_SUFFIX)].replace(".attn.", ".self_attn.")
    out: list[tuple[str, ...]] = [(base,)]
    if base.endswith(".qkv_proj"):
        stem = base[: -len("qkv_proj")]
        out.append((stem + "q_proj", stem + "k_proj", stem + "v_proj"))
    return out


def linear_codes(weight: str, quantized: Mapping[str, "QuantizedWeight"]
                 ) -> tuple[Optional["QuantizedWeight"], tuple[str, ...]]:
    """The codes ``quantized`` (torch module path -> codes) holds for the graph weight ``weight``
    (fused q/k/v concatenated) and the paths they came from; ``(None, ())`` when it holds none."""
    for paths in torch_paths(weight):
        if all(p in quantized for p in paths):
            return (quantized[paths[0]] if len(paths) == 1 else concat_out([quantized[p] for p in paths])), paths
    return None, ()


def check_graph_weight(weight: str, graph_weight: "np.ndarray", qw: "QuantizedWeight", *, values: bool = True
                       ) -> None:
    """The graph's float ``(in, out)`` weight must have ``qw``'s shape and, with ``values``, equal it
    de-quantized (which catches a graph built from another model, or q/k/v in another order)."""
    import numpy as np

    if graph_weight.shape != (qw.codes.shape[1], qw.codes.shape[0]):
        raise ConfigError(f"{weight}: graph weight (in, out) {graph_weight.shape} does not match codes (out, in) "
                          f"{tuple(qw.codes.shape)}")
    if not values:
        return
    expected = qw.dequantize().detach().cpu().numpy().T
    tol = 1e-5 * float(np.abs(expected).max()) + 1e-7
    gap = float(np.abs(graph_weight - expected).max())
    if gap > tol:
        raise ConfigError(f"{weight}: the graph's float weight differs from the de-quantized codes by up to "
                          f"{gap:.3g}; build the graph from the model holding the de-quantized weights")


def save_folder(model, src: Path, out_dir: Optional[PathLike]) -> Path:
    """``model`` with external data plus ``src``'s other files, in ``out_dir`` (or over ``src``)."""
    import onnx

    dest = Path(out_dir) if out_dir is not None else src
    with new_folder(src, dest, replace=out_dir is None) as tmp:
        onnx.save_model(model, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    return dest


@contextlib.contextmanager
def new_folder(src: Path, dest: Path, *, replace: bool, copy: bool = True):
    """A temporary sibling of ``dest`` (holding ``src``'s files but the graph when ``copy``) to
    write into; it becomes ``dest`` when the block ends without an error (whole or absent)."""
    if not replace and dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{dest} exists and is not empty; give a new folder")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for item in src.iterdir() if copy else ():
            if item.name not in (MODEL_FILE, DATA_FILE) and item.is_file():
                shutil.copy2(item, tmp / item.name)
        yield tmp
        mode = tmp.stat().st_mode & 0o666  # what the umask allows (the folder was made 0o777 & ~umask)
        for item in tmp.iterdir():  # onnx writes its data file owner-only; a server may run as another user
            item.chmod(mode)
        old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
