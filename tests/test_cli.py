"""The `mxmoe` command on the CPU: info, check and bench exit 0 and print what they promise.

conftest.py sets TRITON_INTERPRET=1 on CPU-only machines, which makes the Triton backends
"usable" on the CPU. These tests run the command as a user of a CPU-only machine does, without
the interpreter, so that only the torch backend runs.
"""

from __future__ import annotations

import pytest

from mxmoe.cli import main


@pytest.fixture(autouse=True)
def cpu_user_environment(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MXMOE_BACKEND", raising=False)


def run_cli(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_info_names_the_device_versions_and_backends(capsys):
    out = run_cli(capsys, "info")
    for fragment in ("device: cpu", "torch: ", "Triton: ", "CUDA: "):
        assert fragment in out
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line.strip()}
    assert lines["torch"] == "yes"
    for name in ("triton_dequant", "triton_scaled", "bf16"):
        assert lines[name] == "no"  # no GPU and no interpreter
    assert "TRITON_INTERPRET=1" in out  # says why not
    assert "nibble conversion (triton_dequant, bf16): portable" in out
    assert "general-kernel configs (triton_dequant, gpt-oss-20b, M=64): heuristics" in out


def test_info_says_where_the_configs_come_from_on_a_gpu(capsys, monkeypatch, tmp_path):
    import torch

    from mxmoe import cache, settings
    from mxmoe.settings import DeviceFacts

    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(settings, "device_facts", lambda device: DeviceFacts(
        "cuda", "NVIDIA H200", (9, 0), 132, False))
    from mxmoe.cli import info

    assert "family table (nvidia-h100-80gb-hbm3: tuned on sm_90" in info._configs()
    assert "tuned for other kernel sources" in info._configs()


def test_check_passes_the_torch_backend_on_every_case(capsys):
    out = run_cli(capsys, "check")
    torch_rows = [line for line in out.splitlines() if line.startswith("torch ")]
    assert len(torch_rows) == 3
    assert all(line.endswith("PASS") for line in torch_rows)
    for case in ("one token", "k = E", "prime E"):
        assert case in out
    assert "FAIL" not in out and "all passed" in out


def test_check_fails_when_a_backend_misses_the_tolerance(capsys, monkeypatch):
    # A check that cannot fail checks nothing: a backend that is off by 1% must be reported.
    from mxmoe.backends.torch_backend import TorchBackend

    run = TorchBackend.run
    monkeypatch.setattr(TorchBackend, "run", lambda self, args: run(self, args) * 1.01)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "3 failed" in out


def test_check_takes_a_tolerance_of_zero_as_given(capsys, monkeypatch):
    # 0 is a tolerance (the reference's own path meets it), not "use the default".
    from mxmoe.backends.torch_backend import TorchBackend

    run = TorchBackend.run
    monkeypatch.setattr(TorchBackend, "run", lambda self, args: run(self, args) * (1 + 1e-6))
    assert main(["check", "--tolerance", "0"]) == 1
    out = capsys.readouterr().out
    assert "3 failed" in out and "0 for every path" in out


def test_bench_times_each_requested_token_count(capsys, tmp_path):
    out = run_cli(capsys, "bench", "--tokens", "1", "2", "--backends", "torch", "--out",
                  str(tmp_path), "--no-plot")
    assert "no GPU: not performance numbers" in out
    rows = [line.split() for line in out.splitlines() if line[:2] in ("1 ", "2 ")]
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(float(row[3]) > 0 for row in rows)  # the torch column's time
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_unknown_subcommand_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bare_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mxmoe") and "quantize" in out and "check" in out


def test_version(capsys):
    import mxmoe

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mxmoe {mxmoe.__version__}"


def test_help_and_version_import_no_torch():
    # `mxmoe --help` took ~3 s when it imported torch; it and every subcommand's --help now
    # import only argparse and mxmoe's CLI modules.
    import subprocess
    import sys

    code = """
import sys
from mxmoe.cli import main
for argv in (["--help"], ["--version"], *([c, "--help"] for c in
             ("info", "check", "bench", "tune", "quantize"))):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, argv
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "triton", "transformers",
                                                           "numpy", "safetensors"})
print("heavy:", heavy, file=sys.stderr)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == "heavy: []"
    assert "--format {gpt-oss,compressed-tensors}" in out.stdout  # quantize's help ran


@pytest.mark.interpreter
def test_check_passes_every_triton_backend_under_the_interpreter(capsys, monkeypatch):
    # `TRITON_INTERPRET=1 mxmoe check` once failed triton_scaled at the fp32 tolerance; one
    # case here keeps it to seconds (`mxmoe check` runs three).
    from mxmoe.cli import check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(check, "_CPU_CASES", check._CPU_CASES[:1])
    out = run_cli(capsys, "check")
    rows = [line.split() for line in out.splitlines() if line.startswith("triton_")]
    assert sorted({row[0] for row in rows}) == ["triton_dequant", "triton_scaled"]
    assert all(row[-1] == "PASS" for row in rows) and "all passed" in out


def test_check_help_states_the_tolerance_policy(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "0.02 where the arithmetic rounds to 16 bits" in out and "0.0001 where it is fp32" in out


def test_tolerance_policy_gives_triton_scaled_the_16_bit_tolerance():
    import torch

    from mxmoe.cli.check import tolerance_for

    assert tolerance_for("triton_scaled", torch.float32) == 2e-2
    assert tolerance_for("triton_dequant", torch.float32) == 1e-4
    assert tolerance_for("torch", torch.bfloat16) == 2e-2
