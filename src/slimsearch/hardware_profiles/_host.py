"""A profile of this machine, measured: what ``slimsearch hw profile`` writes.

Throughput and overheads are timed in onnxruntime on the CPU, the runtime the
evaluator measures candidates in; memory bandwidth is timed with numpy copies. Power
and energy cannot be timed without a power meter (RAPL is read when the machine
exposes it), so those numbers are labelled estimates.
"""

from __future__ import annotations

import datetime
import platform
import re
import socket
from pathlib import Path

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles._measure import measure_latency
from slimsearch.hardware_profiles._profile import HardwareProfile, PowerMode

__all__ = ["measure_host"]

_NAME_RE = re.compile(r"[^A-Za-z0-9_-]+")


def measure_host(
    *, name: str | None = None, threads: int = 1, quick: bool = False, date: str | None = None
) -> HardwareProfile:
    """Measure this machine's CPU and return it as a profile (every number sourced).

    The profile says ``float_narrow_weights`` (the evaluator's deployable ONNX graph
    runs layers with weights under 8 bits as float convolutions) and not
    ``memory_overlap`` (onnxruntime's CPU convolutions lower their input to a matrix,
    then multiply: the two times add up).

    Measures fp32 matrix-multiply throughput (onnxruntime ``MatMul``), int8 throughput
    (``MatMulInteger``, uint8 x int8 -> int32), memory bandwidth (numpy copies of
    buffers far larger than the last-level cache), and per-call and per-operator
    overhead (onnxruntime graphs of 1 and 33 tiny ``Add`` nodes).

    Args:
        name: Profile name (default: ``local-<hostname>``).
        threads: onnxruntime intra-op threads used for every measurement; use the
            thread count the evaluator will use.
        quick: Small matrices and few repeats (seconds, for tests); the numbers are rougher.
        date: Date written into the sources (default: today).

    Raises:
        ConfigError: ``threads`` is not a positive int.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an int >= 1, got {threads!r}")
    host = socket.gethostname() or "localhost"
    name = name or ("local-" + _NAME_RE.sub("-", host).strip("-"))[:60]
    when = date or datetime.date.today().isoformat()
    measured = f"measured on {host} {when} by slimsearch hw profile"
    size, repeats = (128, 5) if quick else (512, 20)

    fp32_gops = _matmul_gops(size, repeats, threads, integer=False)
    int8_gops = _matmul_gops(size, repeats, threads, integer=True)
    bandwidth_gbps = _bandwidth_gbps(quick)
    call_us, op_us = _overheads_us(repeats, threads)
    cache_bytes, cache_source = _last_level_cache()
    clock_mhz, clock_source = _clock_mhz()
    cores = threads
    # No power meter: per-core figures typical of a current server or laptop core.
    active_w = 10.0 * cores
    idle_w = 2.0 * cores
    rapl = Path("/sys/class/powercap/intel-rapl:0/energy_uj").exists()
    power_note = ("RAPL is exposed here but this profile does not read it yet"
                  if rapl else "no RAPL/powercap interface on this machine")
    estimate_power = (f"estimate: not measured ({power_note}); {{}} per core used "
                      f"x {cores} core(s), typical of a current x86 or Arm core at full load")
    mac_pj_fp32 = active_w / (fp32_gops / 2 * 1e9) * 1e12 * 0.8
    mac_pj_int8 = active_w / (int8_gops / 2 * 1e9) * 1e12 * 0.8

    return HardwareProfile(
        name=name,
        kind="cpu",
        description=(f"This machine ({host}, {platform.machine()}, {platform.processor() or 'cpu'}), "
                     f"measured by slimsearch hw profile on {when} with onnxruntime on {threads} "
                     f"thread(s){' (quick mode)' if quick else ''}. Power and energy are estimates."),
        peak_gops={"fp32": fp32_gops, "int8": int8_gops},
        memory_bandwidth_gbps=bandwidth_gbps,
        on_chip_memory_bytes=cache_bytes,
        sparsity_patterns=(),
        power_modes=(PowerMode(name="host", clock_mhz=clock_mhz, power_w=active_w, default=True),),
        idle_power_w=idle_w,
        active_power_w=active_w,
        energy_pj_per_mac={"fp32": mac_pj_fp32, "int8": mac_pj_int8},
        energy_pj_per_byte=20.0,
        efficiency={"conv": 1.0, "linear": 1.0, "other": 1.0},
        layer_overhead_us=op_us,
        call_overhead_us=call_us,
        # slimsearch's deployable graph gives integer kernels only to W8A8 layers
        # (evaluators/deploy.py); onnxruntime's CPU convolutions lower to im2col + GEMM,
        # one pass after the other, so memory and compute time add up.
        float_narrow_weights=True,
        memory_overlap=False,
        sources={
            "peak_gops.fp32": f"{measured}: onnxruntime MatMul {size}x{size}x{size} fp32, "
                              f"{threads} thread(s), median of {repeats} runs, 2 ops per MAC",
            "peak_gops.int8": f"{measured}: onnxruntime MatMulInteger {size}x{size}x{size} "
                              f"uint8 x int8 -> int32, {threads} thread(s), median of {repeats} runs",
            "memory_bandwidth_gbps": f"{measured}: numpy copy of buffers larger than the last-level "
                                     "cache, bytes read plus written over the median time",
            "on_chip_memory_bytes": f"{cache_source} on {host} {when} (largest cache level)",
            "power_modes.host.clock_mhz": f"{clock_source} on {host} {when}",
            "power_modes.host.power_w": estimate_power.format("10 W"),
            "idle_power_w": estimate_power.format("2 W idle"),
            "active_power_w": estimate_power.format("10 W"),
            "energy_pj_per_mac.fp32": "estimate: 80% of the estimated active power spread over the "
                                      "measured fp32 MAC rate (no power meter on this machine)",
            "energy_pj_per_mac.int8": "estimate: 80% of the estimated active power spread over the "
                                      "measured int8 MAC rate (no power meter on this machine)",
            "energy_pj_per_byte": "estimate: DDR4/LPDDR4 DRAM access at ~20 pJ per byte "
                                  "(device, PHY and controller), not measured on this machine",
            "efficiency.conv": "estimate: 1.0 until `slimsearch hw calibrate` fits it; the peak "
                               "is itself a measured GEMM rate, not a datasheet figure",
            "efficiency.linear": "estimate: 1.0 until `slimsearch hw calibrate` fits it; the peak "
                                 "is itself a measured GEMM rate, not a datasheet figure",
            "efficiency.other": "estimate: 1.0 until `slimsearch hw calibrate` fits it; elementwise "
                                "layers are mostly bound by the measured memory bandwidth",
            "layer_overhead_us": f"{measured}: extra time per onnxruntime node, slope between graphs "
                                 f"of 1 and 33 tiny Add nodes, {threads} thread(s)",
            "call_overhead_us": f"{measured}: time of one session.run of a 1-node graph minus one "
                                "node's overhead",
        },
    )


def _session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _matmul_gops(size: int, repeats: int, threads: int, *, integer: bool) -> float:
    import numpy as np
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    if integer:
        a = rng.integers(0, 255, (size, size), dtype=np.uint8)
        b = rng.integers(-127, 127, (size, size), dtype=np.int8)
        inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]),
                  helper.make_tensor_value_info("b", TensorProto.INT8, [size, size])]
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        out = helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])
    else:
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ab"]
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])
    model = helper.make_model(helper.make_graph([node], "matmul", inputs, [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = _session(model, threads)
    feed = {"a": a, "b": b}
    timing = measure_latency(lambda: session.run(None, feed), warmup=2, repeats=repeats)
    return 2.0 * size**3 / (timing.median_ms * 1e-3) / 1e9


def _bandwidth_gbps(quick: bool) -> float:
    import numpy as np

    n_bytes = (32 if quick else 128) * 2**20
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    timing = measure_latency(lambda: np.copyto(dst, src), warmup=1, repeats=3 if quick else 10)
    return 2.0 * n_bytes / (timing.median_ms * 1e-3) / 1e9


def _overheads_us(repeats: int, threads: int) -> tuple[float, float]:
    import numpy as np
    from onnx import TensorProto, helper

    def chain(length: int) -> float:
        nodes = [helper.make_node("Add", ["x" if k == 0 else f"t{k}", "one"],
                                  ["y" if k == length - 1 else f"t{k + 1}"]) for k in range(length)]
        graph = helper.make_graph(
            nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
            initializer=[helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # keep every node: the point is to time per-node dispatch
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = {"x": np.zeros((1, 8), dtype=np.float32)}
        return measure_latency(lambda: session.run(None, feed), warmup=20, repeats=max(50, repeats * 20)).median_ms

    one, many = chain(1), chain(33)
    per_op_us = max(0.0, (many - one) / 32 * 1e3)
    return max(0.0, one * 1e3 - per_op_us), per_op_us


def _last_level_cache() -> tuple[int, str]:
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)])
    if sizes:
        return max(sizes), "read from /sys/devices/system/cpu/cpu0/cache/index*/size"
    return 0, "not found: no /sys/devices/system/cpu/cpu0/cache on this machine, 0 recorded"


def _clock_mhz() -> tuple[float, str]:
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_freq.exists():
        return int(max_freq.read_text()) / 1000.0, "read from cpufreq cpuinfo_max_freq"
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"cpu MHz\s*:\s*([\d.]+)", text)
        if match:
            return float(match.group(1)), "read from 'cpu MHz' in /proc/cpuinfo"
    except OSError:
        pass
    return 1000.0, ("estimate: the clock could not be read on this machine (no cpufreq, no "
                    "/proc/cpuinfo); 1000 MHz recorded as a placeholder that only scales power modes")
