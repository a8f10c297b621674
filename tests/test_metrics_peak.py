"""The MFU denominator: the measured bf16 matmul peak, cached per GPU name."""

import json

import torch

from epg_fast.metrics import PeakTflops, cached_peak_tflops, measured_peak_tflops


class FakeMeasurement:
    def __init__(self, value: float) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def test_peak_is_measured_once_per_gpu_name_then_read_from_the_cache(tmp_path):
    fake = FakeMeasurement(790.5)
    first = cached_peak_tflops("NVIDIA H200", fake, tmp_path)
    again = cached_peak_tflops("NVIDIA H200", FakeMeasurement(1.0), tmp_path)  # must not be asked
    assert first == again == PeakTflops(measured=790.5, datasheet=989.4)
    assert fake.calls == 1
    other = FakeMeasurement(280.0)
    assert cached_peak_tflops("NVIDIA A100-SXM4-80GB", other, tmp_path) == PeakTflops(280.0, 312.0)
    assert other.calls == 1
    table = json.loads((tmp_path / "peak_tflops.json").read_text())
    assert {k: v["measured_tflops"] for k, v in table.items()} == {"NVIDIA H200": 790.5, "NVIDIA A100-SXM4-80GB": 280.0}


def test_unknown_gpu_has_no_datasheet_value_and_a_corrupt_cache_is_remeasured(tmp_path):
    (tmp_path / "peak_tflops.json").write_text("{not json")
    fake = FakeMeasurement(100.0)
    assert cached_peak_tflops("Some Future GPU", fake, tmp_path) == PeakTflops(100.0, None)
    assert fake.calls == 1
    assert json.loads((tmp_path / "peak_tflops.json").read_text())["Some Future GPU"]["measured_tflops"] == 100.0


def test_cache_dir_follows_epg_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EPG_CACHE_DIR", str(tmp_path / "c"))
    cached_peak_tflops("NVIDIA H100 80GB HBM3", FakeMeasurement(760.0), None)
    assert (tmp_path / "c" / "peak_tflops.json").exists()


def test_cpu_has_no_peak():
    assert measured_peak_tflops(torch.device("cpu")) is None
