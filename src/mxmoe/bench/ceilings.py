"""The device's ceilings, measured at the start of a run: copy bandwidth and bf16 matmul rate."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

# What FACTS.md measured on the H100 80GB HBM3 (2026-11-24); for tests and `--ceilings`.
H100_COPY_BYTES_PER_S = 3.02e12
H100_MATMUL_FLOPS_PER_S = 732e12


@dataclass
class Ceilings:
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written per second
    matmul_flops_per_s: float  # dense matmul, FLOP per second
    source: str  # "measured" or "given"
    copy_tensor_bytes: int = 0  # size of the copied tensor
    matmul_size: int = 0  # n of the n×n×n matmul
    matmul_dtype: str = ""
    device: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["copy_gb_per_s"] = self.copy_bytes_per_s / 1e9
        d["matmul_tflop_per_s"] = self.matmul_flops_per_s / 1e12
        return d


def given_ceilings(copy_gb_per_s: float, matmul_tflop_per_s: float, device: str = "") -> Ceilings:
    return Ceilings(copy_gb_per_s * 1e9, matmul_tflop_per_s * 1e12, "given", device=device)


def _median_seconds(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(reps)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings(device: torch.device) -> Ceilings:
    """Copy rate of a large tensor and the n³ matmul rate, on ``device``.

    GPU: a 1 GiB copy (far past any cache) and a bf16 8192³ `torch.matmul` (cuBLAS), each the
    median of 20 after warm-up. CPU: a 64 MiB copy and a float32 512³ matmul, only so that a
    CPU run has floors at all; they say nothing about a GPU.
    """
    if device.type == "cuda":
        copy_bytes, n, dtype, reps = 2**30, 8192, torch.bfloat16, 20
    else:
        copy_bytes, n, dtype, reps = 2**26, 512, torch.float32, 5
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    del src, dst
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    matmul_s = _median_seconds(lambda: torch.matmul(a, b, out=c), device, warmup=3, reps=reps)
    del a, b, c
    if device.type == "cuda":
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Ceilings(
        copy_bytes_per_s=2 * copy_bytes / copy_s,
        matmul_flops_per_s=2 * n**3 / matmul_s,
        source="measured",
        copy_tensor_bytes=copy_bytes,
        matmul_size=n,
        matmul_dtype=str(dtype).replace("torch.", ""),
        device=name,
    )
