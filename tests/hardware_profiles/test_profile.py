"""Profile files, their validation and their JSON round trip (conformance: every shipped profile)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from slimsearch.exceptions import ConfigError
from slimsearch.hardware_profiles import (
    DeviceKind,
    HardwareProfile,
    Precision,
    list_profiles,
    load_profile,
)

SHIPPED = list_profiles()


def test_the_two_first_profiles_ship():
    assert {"raspberry-pi-4", "jetson-orin-nano"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_profile_loads_and_every_number_has_a_source(name):
    profile = load_profile(name)
    assert profile.name == name
    numbers = profile.numeric_fields()
    assert set(profile.sources) == set(numbers)
    for path, value in numbers.items():
        assert isinstance(value, (int, float)), path
        assert profile.sources[path].strip(), path
    assert sum(mode.default for mode in profile.power_modes) == 1
    assert profile.precisions


@pytest.mark.parametrize("name", SHIPPED)
def test_profile_round_trips_through_json_and_files(name, tmp_path):
    profile = load_profile(name)
    text = profile.to_json()
    assert json.loads(text)["name"] == name
    assert HardwareProfile.from_json(text) == profile
    assert HardwareProfile.from_dict(profile.to_dict()) == profile
    for suffix, dump in ((".json", json.dumps), (".yaml", yaml.safe_dump)):
        path = tmp_path / f"copy{suffix}"
        path.write_text(dump(profile.to_dict()))
        assert load_profile(path) == profile
        assert load_profile(str(path)) == profile


@pytest.mark.parametrize("name", SHIPPED)
def test_raw_file_has_no_undeclared_keys(name):
    # The loader rejects unknown keys; this checks the shipped file against to_dict's layout.
    from importlib.resources import files

    raw = yaml.safe_load((files("slimsearch.hardware_profiles") / "profiles" / f"{name}.yaml").read_text())
    assert set(raw) == set(load_profile(name).to_dict())


def test_shipped_values_are_the_documented_devices():
    pi = load_profile("raspberry-pi-4")
    assert pi.kind is DeviceKind.CPU
    assert pi.precisions == (Precision.INT8, Precision.FP32)
    assert pi.sparsity_patterns == ()
    assert pi.price_usd_per_hour is None
    orin = load_profile("jetson-orin-nano")
    assert orin.kind is DeviceKind.GPU
    assert orin.precisions == (Precision.INT8, Precision.FP16, Precision.FP32)
    assert orin.sparsity_patterns == ("2:4",)
    assert [m.name for m in orin.power_modes] == ["15W", "7W"]
    assert orin.default_power_mode.name == "15W"


def test_unknown_profile_name_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        load_profile("raspberry-pi-99")
    message = str(info.value)
    assert "'raspberry-pi-99'" in message
    for name in SHIPPED:
        assert name in message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "nope.yaml")


def _pi_data() -> dict:
    return copy.deepcopy(load_profile("raspberry-pi-4").to_dict())


def _load_broken(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def test_unknown_key_names_file_field_and_allowed_keys(tmp_path):
    data = _pi_data()
    data["memory_bandwith_gbps"] = 5.0
    message = _load_broken(tmp_path, data)
    assert "memory_bandwith_gbps" in message
    assert "did you mean 'memory_bandwidth_gbps'" in message
    assert "allowed keys" in message


def test_negative_bandwidth_names_the_field_and_the_range(tmp_path):
    data = _pi_data()
    data["memory_bandwidth_gbps"] = -1.0
    message = _load_broken(tmp_path, data)
    assert "memory_bandwidth_gbps" in message
    assert "> 0" in message and "-1.0" in message


def test_a_number_without_a_source_is_refused(tmp_path):
    data = _pi_data()
    del data["sources"]["idle_power_w"]
    message = _load_broken(tmp_path, data)
    assert "sources.idle_power_w" in message and "missing" in message


def test_a_source_for_no_number_is_refused(tmp_path):
    data = _pi_data()
    data["sources"]["peak_gops.fp16"] = "datasheet"
    message = _load_broken(tmp_path, data)
    assert "sources.peak_gops.fp16" in message


def test_a_priced_profile_needs_a_source_for_the_price(tmp_path):
    data = _pi_data()
    data["price_usd_per_hour"] = 0.5
    assert "sources.price_usd_per_hour" in _load_broken(tmp_path, data)
    data["sources"]["price_usd_per_hour"] = "estimate: test"
    path = tmp_path / "priced.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_profile(path).price_usd_per_hour == 0.5


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["peak_gops"].update(fp64=1.0), "peak_gops.fp64"),
        (lambda d: d.update(kind="tpu"), "kind"),
        (lambda d: d["efficiency"].update(conv=9.0), "efficiency.conv"),
        (lambda d: d["efficiency"].pop("linear"), "efficiency: must give the base op types"),
        (lambda d: d.update(op_overhead_us={"conv": -1}), "op_overhead_us.conv"),
        (lambda d: d.update(pool_as_conv="yes"), "pool_as_conv: must be true or false"),
        (lambda d: d["energy_pj_per_mac"].pop("int8"), "energy_pj_per_mac"),
        (lambda d: d["power_modes"][0].update(default=False), "exactly one mode must be default"),
        (lambda d: d["power_modes"][0].update(clock_mhz=0), "power_modes.stock.clock_mhz"),
        (lambda d: d["power_modes"][0].update(volts=1.0), "power_modes[0].volts"),
        (lambda d: d.update(sparsity_patterns=["4:2"]), "sparsity_patterns"),
        (lambda d: d.update(idle_power_w=9.0), "idle_power_w"),
        (lambda d: d.update(on_chip_memory_bytes=1.5), "on_chip_memory_bytes"),
        (lambda d: d.update(schema_version=2), "schema_version"),
        (lambda d: d.pop("efficiency"), "missing required key"),
    ],
)
def test_invalid_fields_are_named(tmp_path, edit, expected):
    data = _pi_data()
    edit(data)
    assert expected in _load_broken(tmp_path, data)


def test_unknown_precision_lists_the_allowed_ones(tmp_path):
    data = _pi_data()
    data["peak_gops"]["fp64"] = 1.0
    message = _load_broken(tmp_path, data)
    assert "['fp32', 'fp16', 'int8', 'int4']" in message


def test_invalid_yaml_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_power_modes_by_name():
    orin = load_profile("jetson-orin-nano")
    assert orin.power_mode().name == "15W"
    assert orin.power_mode("7W").clock_mhz < orin.power_mode("15W").clock_mhz
    with pytest.raises(ConfigError, match=r"must be one of \['15W', '7W'\]"):
        orin.power_mode("MAXN")


@pytest.mark.parametrize(
    ("bits", "expected"),
    [(1, Precision.INT4), (4, Precision.INT4), (5, Precision.INT8), (8, Precision.INT8),
     (12, Precision.FP16), (16, Precision.FP16), (17, Precision.FP32), (32, Precision.FP32)],
)
def test_precision_from_bits(bits, expected):
    assert Precision.from_bits(bits) is expected


@pytest.mark.parametrize("bits", [0, 33, 8.0, True])
def test_precision_from_bits_rejects_bad_widths(bits):
    with pytest.raises(ConfigError, match=r"\[1, 32\]"):
        Precision.from_bits(bits)


def test_kernel_precision_falls_back_to_the_next_supported_one():
    pi, orin = load_profile("raspberry-pi-4"), load_profile("jetson-orin-nano")
    assert pi.kernel_precision(4) is Precision.INT8
    assert pi.kernel_precision(16) is Precision.FP32  # Cortex-A72 has no fp16 arithmetic
    assert orin.kernel_precision(4) is Precision.INT8
    assert orin.kernel_precision(16) is Precision.FP16
