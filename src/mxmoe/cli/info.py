"""Show the device, the versions, and which backends are usable here (and why not)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--reprobe", action="store_true",
                        help="forget the cached probe verdicts and probe the GPU backends again")


def run(args) -> int:
    from ..backends import backend_statuses, get_backend, probe, reprobe
    from ._common import environment, header

    if args.reprobe:
        reprobe()
    info = environment()
    print(header(info))
    print()
    print(f"{'backend':<16} {'usable':<7} {'probe':<7} {'max err':>9}  reason")
    for status in backend_statuses():
        verdict = status.probe
        source = verdict.source if verdict else "-"
        err = f"{verdict.max_rel_err:.2e}" if verdict and verdict.max_rel_err is not None else "-"
        reason = status.reason or (verdict.note if verdict else "")
        if status.usable and verdict is None and get_backend(status.name).needs_probe:
            reason = "static check only: the probe runs on CUDA devices"
        print(f"{status.name:<16} {'yes' if status.usable else 'no':<7} {source:<7} {err:>9}  "
              f"{reason}")
    print(f"\nprobe cache: {probe.cache_path()} (tolerance {probe.TOLERANCE:g}; --reprobe redoes)")
    print(f"nibble conversion (triton_dequant, bf16): {_conversion()}")
    print(f"general-kernel configs (triton_dequant, gpt-oss-20b, M=64): {_configs()}")
    return 0


def _configs() -> str:
    """Where the general kernel's config for a gpt-oss-20b call of 64 tokens comes from on
    this machine's GPU (`mxmoe.kernels.configs.explain`: the user cache, a shipped table and
    whether it was tuned on these kernel sources, a family table, derived, heuristics)."""
    import torch

    from .. import settings
    from ..kernels import configs

    if not torch.cuda.is_available():
        return "heuristics (no GPU here)"
    facts = settings.device_facts(torch.device("cuda"))
    chosen = configs.explain("triton_dequant", facts, 64, 2880, 2880, 32, 4)
    return chosen.source + (f" ({chosen.detail})" if chosen.detail else "")


def _conversion() -> str:
    """Which E2M1 -> bf16 conversion `triton_dequant` compiles on this machine's GPU."""
    import os

    import torch

    from ..kernels.fused_moe import use_dequant_ptx

    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available():
        return "portable (no GPU kernels compiled here)"
    if use_dequant_ptx(torch.device("cuda"), torch.bfloat16):
        return "PTX, two values per 32-bit op (MXMOE_DEQUANT_PTX=0 for the portable one)"
    return "portable bit manipulation (PTX needs an NVIDIA GPU of sm_80 or newer)"
