"""The host-cost measurement of `mxmoe bench` (eager host time, launch count, bare launches):
its control flow on the CPU with fakes, and the real thing on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

from mxmoe.bench.host import (HostCost, HostMeter, device_activity_counts, host_reps,
                              time_host)


def test_time_host_syncs_before_each_call_never_inside():
    log = []
    seconds = time_host(lambda i: log.append(("call", i)), 3, lambda: log.append("sync"))
    assert len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert log == ["sync", ("call", 0), "sync", ("call", 1), "sync", ("call", 2), "sync"]


def test_host_reps_bounds():
    assert host_reps(1e-6) == 200 and host_reps(5e-3) == 40
    assert host_reps(2e-3) == 100
    assert host_reps(1.0) == 5  # the reference at large M: a few calls are enough


class _Event:
    def __init__(self, name, device_type, activity_type=None):
        self.name, self.device_type, self.activity_type = name, device_type, activity_type


def test_launch_count_takes_device_activities_and_separates_copies():
    from torch.autograd import DeviceType

    events = [_Event("aten::mm", DeviceType.CPU), _Event("cudaLaunchKernel", DeviceType.CPU),
              _Event("_moe_gemm_kernel", DeviceType.CUDA, "kernel"),
              _Event("_route_kernel", DeviceType.CUDA),
              _Event("Memset (Device)", DeviceType.CUDA),
              _Event("copy", DeviceType.CUDA, "gpu_memcpy")]
    assert device_activity_counts(events) == (4, 2)


def test_host_cost_row_fields():
    row = HostCost(us=300.0, us_min=250.0, reps=50, launches=6, kernels=6, bare_us=120.0,
                   bare_direct_us=80.0, notes=["a", "b"]).as_row()
    assert row["host_ratio"] == pytest.approx(2.5) and row["launches"] == 6
    assert row["host_note"] == "a; b"
    empty = HostCost().as_row()
    assert empty["host_us"] is None and empty["host_ratio"] is None


@pytest.mark.parametrize("cuda, preset, expected", [
    ("13.0", None, "1"), ("12.6", None, "1"), ("12.4", None, None), (None, None, None),
    ("13.0", "0", "0"), ("12.1", "1", "1"), ("garbled", None, None),
], ids=["CUDA 13", "CUDA 12.6", "CUDA 12.4: left attached", "no CUDA", "the user's 0 kept",
        "the user's 1 kept", "unparsable version"])
def test_cupti_is_released_after_profiles_where_torch_deems_it_safe(monkeypatch, cuda, preset,
                                                                     expected):
    from mxmoe.bench.host import release_cupti_after_profiles

    monkeypatch.setenv("TEARDOWN_CUPTI", "placeholder")  # records the original for the undo
    if preset is None:
        monkeypatch.delenv("TEARDOWN_CUPTI")
    else:
        monkeypatch.setenv("TEARDOWN_CUPTI", preset)
    assert release_cupti_after_profiles(cuda) is (expected == "1")
    assert os.environ.get("TEARDOWN_CUPTI") == expected


def test_host_cost_row_records_the_cupti_teardown():
    assert HostCost(cupti_teardown=True).as_row()["host_cupti_teardown"] is True
    assert HostCost().as_row()["host_cupti_teardown"] is None


@pytest.mark.gpu
def test_host_meter_counts_and_times_launches_on_the_gpu():
    device = torch.device("cuda")
    x = torch.randn(64, device=device)

    def three_kernels(_inputs):
        return ((x + 1) * 2).neg()

    cost = HostMeter(device).measure(three_kernels, [None, None], 1e-5)
    assert cost.launches == 3 and cost.kernels == 3, cost
    assert cost.us is not None and cost.us > 0 and cost.reps >= 20
    assert cost.bare_us is not None and cost.bare_us > 0, cost.notes
    assert cost.bare_direct_us is None or cost.bare_direct_us > 0
