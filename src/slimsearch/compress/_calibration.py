"""Block-by-block calibration of a decoder LLM, shared by GPTQ, AWQ and SmoothQuant.

The hidden states (and the keyword arguments: attention mask, rotary position
embeddings, ...) entering the first decoder block are captured once, by a forward
pre-hook that stops the forward there. Each block then runs on its stored inputs,
one linear group at a time: the group's input reaches a caller's function, which
changes the group's weights in place, and the next group's input is taken from the
block as changed so far ("true sequential"). Last, the changed block produces the
next block's inputs, so the errors of quantized blocks propagate as in GPTQ.

Also here: the in-place/unchanged helpers every method of this family shares
(:class:`Hooks`, folding per-input-channel scales into a group's predecessor).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence

from slimsearch.exceptions import ConfigError
from slimsearch.structures import llm

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Hooks", "capture_block_inputs", "check_calibration", "fold_scales", "foldable", "inference",
           "run_block", "run_groups", "sequential_groups"]

GROUP_NAMES = ("qkv", "o", "gate_up", "down")


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (its work is done)."""


class Hooks:
    """Handles of hooks a method added; ``remove()`` takes them all out."""

    def __init__(self, handles: Sequence = ()) -> None:
        self.handles = list(handles)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def check_calibration(calib: "torch.Tensor") -> None:
    """Calibration data must be a 2-D integer tensor of token windows ``(n, seq_len)``."""
    import torch

    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        got = type(calib).__name__ if not isinstance(calib, torch.Tensor) else f"{tuple(calib.shape)} {calib.dtype}"
        raise ConfigError(f"calibration data must be a LongTensor of token windows (n, seq_len), got {got}")
    if calib.shape[0] == 0 or calib.shape[1] == 0:
        raise ConfigError(f"calibration data must hold at least one token, got shape {tuple(calib.shape)}")


@contextmanager
def inference(model: "nn.Module") -> Iterator[None]:
    """No gradients, eval mode (no dropout) and no KV cache, restored afterwards."""
    import torch

    training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)
        if config is not None:
            config.use_cache = use_cache


def _device(model: "nn.Module") -> "torch.device":
    return next(model.parameters()).device


def capture_block_inputs(model: "nn.Module", calib: "torch.Tensor", batch_size: int = 1) -> list[tuple]:
    """``(args, kwargs)`` the first decoder block is called with, one entry per batch of windows."""
    check_calibration(calib)
    first = llm.blocks(model)[0]
    captured: list[tuple] = []

    def grab(_module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = _device(model)
    try:
        with inference(model):
            for start in range(0, calib.shape[0], batch_size):
                ids = calib[start:start + batch_size].to(device)
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(captured) != -(-calib.shape[0] // batch_size):
        raise RuntimeError("the first decoder block was not reached by the forward pass")
    return captured


def _hidden(args: tuple, kwargs: dict) -> "torch.Tensor":
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: "torch.Tensor") -> tuple[tuple, dict]:
    if args:
        return (hidden,) + args[1:], kwargs
    return args, {**kwargs, "hidden_states": hidden}


def run_block(block: "nn.Module", args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block's output, as the ``(args, kwargs)`` the next block is called with."""
    output = block(*args, **kwargs)
    return _with_hidden(args, kwargs, output[0] if isinstance(output, (tuple, list)) else output)


GroupFn = Callable[[int, "llm.LinearGroup", list[str], Callable[[], Iterable["torch.Tensor"]]], None]


def sequential_groups(model: "nn.Module", calib: "torch.Tensor", process: GroupFn, *,
                      groups: Sequence[str] = GROUP_NAMES, batch_size: int = 1) -> None:
    """Call ``process(block index, group, member paths, inputs)`` for every selected group, in order.

    ``inputs()`` yields, batch by batch, the group's input as ``(windows, seq_len,
    in_features)`` float32 (position 0 of a window is its first token, the attention
    sink), computed from the calibration windows through the model as changed so far
    (earlier blocks and earlier groups of this block included). ``process`` may call it
    more than once; it changes the group's weights in place (or not at all).
    """
    import torch

    family = llm.family_of(model)
    stored = capture_block_inputs(model, calib, batch_size)
    with inference(model):
        for index, block in enumerate(llm.blocks(model)):
            prefix = f"{family.layers}.{index}."
            for group in family.groups:
                if group.name not in groups:
                    continue
                paths = [prefix + m for m in group.members]
                first = llm.get(model, paths[0])

                def inputs(first=first, block=block) -> Iterator["torch.Tensor"]:
                    seen: list = []

                    def grab(_module, args):
                        seen.append(args[0])
                        raise _Stop

                    for args, kwargs in stored:
                        handle = first.register_forward_pre_hook(grab)
                        try:
                            block(*args, **kwargs)
                        except _Stop:
                            pass
                        finally:
                            handle.remove()
                        x = seen.pop()
                        yield x.reshape(x.shape[0], -1, x.shape[-1]).to(torch.float32)

                process(index, group, paths, inputs)
            stored = [run_block(block, args, kwargs) for args, kwargs in stored]


def run_groups(model: "nn.Module", process: Callable[[int, "llm.LinearGroup", list[str]], None], *,
               groups: Sequence[str] = GROUP_NAMES) -> None:
    """Call ``process(block index, group, member paths)`` for every selected group (no data)."""
    for index, group, paths in llm.group_linears(model):
        if group.name in groups:
            process(index, group, paths)


def foldable(model: "nn.Module", group: "llm.LinearGroup") -> bool:
    """Whether a per-input-channel scale of ``group`` can fold into its predecessor.

    A norm always can. A previous linear can when its output rows map one to one onto
    the group's input columns: ``v_proj`` -> ``o_proj`` only when no key/value head is
    shared (with grouped-query attention one ``v_proj`` row feeds several query heads'
    columns of ``o_proj``, which a single scale per row cannot serve).
    """
    if group.norm is not None:
        return True
    if group.prev is None:
        return False
    if group.prev.endswith("v_proj"):
        n_heads, n_kv, _ = llm.heads(model)
        return n_heads == n_kv
    return True


def predecessor(model: "nn.Module", index: int, group: "llm.LinearGroup") -> Optional[str]:
    """Full path of what ``group``'s scales fold into, or None."""
    if not foldable(model, group):
        return None
    family = llm.family_of(model)
    return f"{family.layers}.{index}.{group.norm or group.prev}"


def fold_scales(model: "nn.Module", index: int, group: "llm.LinearGroup", paths: Sequence[str],
                scales: "torch.Tensor") -> None:
    """Multiply the members' input columns by ``scales`` and divide the predecessor's output
    by them, in place: the model computes the same function (up to float rounding)."""
    import torch

    target = predecessor(model, index, group)
    if target is None:
        raise ValueError(f"group {group.name!r} of block {index} has no predecessor to fold scales into")
    with torch.no_grad():
        scales = scales.to(torch.float32)
        for path in paths:
            module = llm.get(model, path)
            weight = llm.weight_of(module)
            llm.set_weight(module, weight.to(torch.float32) * scales.to(weight.device)[None, :])
        prev = llm.get(model, target)
        if group.norm is not None:
            prev.weight.copy_((prev.weight.to(torch.float32) / scales.to(prev.weight.device)).to(prev.weight.dtype))
        else:
            weight = llm.weight_of(prev)
            llm.set_weight(prev, weight.to(torch.float32) / scales.to(weight.device)[:, None])
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias.copy_((bias.to(torch.float32) / scales.to(bias.device)).to(bias.dtype))
