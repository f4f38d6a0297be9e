"""The backend registry, `backends()`, `resolve_backend` and the `auto` choice.

GPU behaviour is simulated on the CPU: a ``cuda:0`` device object needs no GPU, the static
check passes once ``TRITON_INTERPRET`` is off, and `probe.probe` is replaced by a table of
verdicts, so these tests decide exactly what the probe would have said.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types

import pytest
import torch

import mxmoe
from mxmoe import settings
from mxmoe.backends import probe, resolve_backend
from mxmoe.kernels import configs as kernel_configs
from mxmoe.validation import MoEProblem

from helpers import make_moe

# The package, not the function `mxmoe.backends` that shadows it as an attribute of `mxmoe`.
registry = importlib.import_module("mxmoe.backends")
CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)
TRITON_BACKENDS = ("triton_dequant", "triton_scaled", "bf16")
PROBLEM = MoEProblem(num_tokens=64, hidden=2880, intermediate=2880, num_local_experts=32,
                     num_global_experts=32, top_k=4, activation=mxmoe.Activation.SWIGLUOAI)


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch, tmp_path):
    """No MXMOE_BACKEND, no statuses or choices remembered from another test, and a private
    probe cache (on a GPU machine a real probe must not touch the user's)."""
    monkeypatch.delenv(registry.BACKEND_ENV, raising=False)
    monkeypatch.setenv(probe.CACHE_DIR_ENV, str(tmp_path / "cache"))
    registry.forget_decisions()
    yield
    registry.forget_decisions()


def set_interpret(monkeypatch, on: bool) -> None:
    """Set TRITON_INTERPRET for one test, after importing Triton under the session's setting.

    Triton decorates its own `@triton.jit` library functions (tl.max, ...) once, at import, for
    the mode then in force; imported first here with the interpreter off, they would break
    every later interpreter test in this process.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    monkeypatch.setenv("TRITON_INTERPRET", "1" if on else "0")


@pytest.fixture
def interpret(monkeypatch):
    return lambda on: set_interpret(monkeypatch, on)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A simulated GPU whose probe verdicts the test sets: ``fake_gpu.verdicts[name] = reason``
    ('' = usable). Records which backends were probed and what the tuned table was asked."""
    set_interpret(monkeypatch, False)
    state = types.SimpleNamespace(verdicts={n: "" for n in TRITON_BACKENDS}, probed=[],
                                  preference=None, asked=[])

    def fake_probe(name, device, **kwargs):
        state.probed.append(name)
        reason = state.verdicts[name]
        return probe.ProbeResult(name, reason == "", reason, 1e-3 if not reason else None)

    def fake_hook(*args):
        state.asked.append(args)
        return state.preference

    monkeypatch.setattr(probe, "probe", fake_probe)
    monkeypatch.setattr(kernel_configs, "fastest_backend", fake_hook)
    fake_facts = settings.DeviceFacts("cuda", "Fake GPU 80GB", (9, 0), 132, False)
    monkeypatch.setattr(settings, "device_facts", lambda device: fake_facts)
    return state


# --------------------------------------------------------------------------- the registry


def test_registry_holds_the_four_backends_in_order():
    assert registry.BACKEND_NAMES == ("torch", "triton_dequant", "triton_scaled", "bf16")
    for name in registry.BACKEND_NAMES:
        assert registry.get_backend(name).name == name
        assert registry.get_backend(name) is registry.get_backend(name)


def test_only_bf16_keeps_a_dense_copy_and_only_triton_backends_are_probed():
    packed = {n: registry.get_backend(n).keeps_weights_packed for n in registry.BACKEND_NAMES}
    probed = {n: registry.get_backend(n).needs_probe for n in registry.BACKEND_NAMES}
    assert packed == {"torch": True, "triton_dequant": True, "triton_scaled": True, "bf16": False}
    assert probed == {"torch": False, "triton_dequant": True, "triton_scaled": True, "bf16": True}


def test_cpu_without_interpreter_only_torch_is_usable(interpret):
    interpret(False)
    table = mxmoe.backends("cpu")
    assert list(table) == list(registry.BACKEND_NAMES)
    assert table["torch"] == (True, "")
    for name in TRITON_BACKENDS:
        usable, reason = table[name]
        assert not usable and "TRITON_INTERPRET=1" in reason


def test_cpu_under_interpreter_triton_is_usable_without_probing(interpret, monkeypatch):
    interpret(True)
    monkeypatch.setattr(probe, "probe", lambda *a, **k: pytest.fail("probed on the CPU"))
    assert all(usable for usable, _ in mxmoe.backends("cpu").values())


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown backend 'cutlass'") as info:
        resolve_backend("cutlass", CPU)
    for name in ("auto", *registry.BACKEND_NAMES):
        assert repr(name) in str(info.value)


# --------------------------------------------------------------------------- auto on the CPU


@pytest.mark.parametrize("interpreting", [False, True], ids=["plain", "TRITON_INTERPRET=1"])
def test_auto_is_torch_without_a_gpu(interpret, interpreting):
    interpret(interpreting)
    assert resolve_backend("auto", CPU).name == "torch"
    assert resolve_backend("auto", CPU, PROBLEM).name == "torch"


def test_auto_through_fused_experts_on_the_cpu():
    moe = make_moe(3, 64, 32, 4, 2)
    out = mxmoe.fused_experts(**moe)
    ref = mxmoe.fused_experts(**moe, backend="torch")
    assert torch.equal(out, ref)


def test_fused_experts_hands_its_problem_and_layout_to_resolve_backend(monkeypatch):
    seen = []

    def spy(name, device, problem=None, layout=None):
        seen.append((problem, layout))
        return resolve_backend(name, device, problem, layout)

    monkeypatch.setattr(mxmoe.plans, "resolve_backend", spy)
    kw = make_moe(3, 64, 32, 4, 2)
    mxmoe.fused_experts(**dict(kw, w13=kw["w13"].to_layout("mma_lanes"),
                               w2=kw["w2"].to_layout("mma_lanes")))
    problem, layout = seen[0]
    assert (problem.num_tokens, problem.hidden, problem.intermediate, problem.top_k) == \
        (3, 64, 32, 2)
    assert layout == "mma_lanes"


# --------------------------------------------------------------------------- MXMOE_BACKEND


def test_env_overrides_auto(monkeypatch, interpret):
    interpret(True)
    monkeypatch.setenv("MXMOE_BACKEND", "triton_scaled")
    assert resolve_backend("auto", CPU).name == "triton_scaled"


def test_env_does_not_override_an_explicit_name(monkeypatch, interpret):
    interpret(True)
    monkeypatch.setenv("MXMOE_BACKEND", "triton_scaled")
    assert resolve_backend("torch", CPU).name == "torch"


@pytest.mark.parametrize("value", ["auto", "", "  "])
def test_env_auto_or_empty_means_auto(monkeypatch, value):
    monkeypatch.setenv("MXMOE_BACKEND", value)
    assert resolve_backend("auto", CPU).name == "torch"


def test_env_with_unknown_name_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("MXMOE_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"unknown backend 'fast' \(from MXMOE_BACKEND\)"):
        resolve_backend("auto", CPU)


def test_env_naming_an_unusable_backend_raises_through_fused_experts(monkeypatch, interpret):
    interpret(False)
    monkeypatch.setenv("MXMOE_BACKEND", "bf16")
    with pytest.raises(ValueError, match=r"'bf16' \(from MXMOE_BACKEND\) is not usable"):
        mxmoe.fused_experts(**make_moe(3, 64, 32, 4, 2))


# --------------------------------------------------------------------------- unusable by name


def test_unusable_backend_by_name_says_why_and_lists_usable(interpret):
    interpret(False)
    with pytest.raises(ValueError) as info:
        resolve_backend("triton_dequant", CPU)
    message = str(info.value)
    assert "'triton_dequant' is not usable on cpu" in message
    assert "TRITON_INTERPRET=1" in message and "usable here: ['torch']" in message


def test_backend_failing_its_probe_by_name_gives_the_probe_reason(fake_gpu):
    fake_gpu.verdicts["triton_scaled"] = "the probe child was killed by SIGSEGV"
    with pytest.raises(ValueError, match="killed by SIGSEGV") as info:
        resolve_backend("triton_scaled", GPU)
    assert "usable here: ['torch', 'triton_dequant', 'bf16']" in str(info.value)


def test_bf16_by_name_is_allowed_on_a_gpu(fake_gpu):
    assert resolve_backend("bf16", GPU).name == "bf16"


# --------------------------------------------------------------------------- auto on a GPU


def test_auto_on_a_gpu_defaults_to_triton_dequant_and_probes_only_it(fake_gpu):
    fake_gpu.preference = None
    assert resolve_backend("auto", GPU, PROBLEM).name == "triton_dequant"
    assert fake_gpu.probed == ["triton_dequant"]  # no child for backends auto did not need


@pytest.mark.parametrize("unusable, chosen", [
    (["triton_dequant"], "triton_scaled"),
    (["triton_dequant", "triton_scaled"], "torch"),
], ids=["dequant broken", "both broken"])
def test_auto_falls_back_to_triton_scaled_then_torch(fake_gpu, unusable, chosen, recwarn):
    for name in unusable:
        fake_gpu.verdicts[name] = "wrong answer"
    assert resolve_backend("auto", GPU, PROBLEM).name == chosen


def test_auto_warns_once_when_a_gpu_gets_the_reference(fake_gpu):
    fake_gpu.verdicts.update(triton_dequant="wrong answer", triton_scaled="timed out")
    with pytest.warns(RuntimeWarning, match="runs the pure-torch reference on cuda:0") as seen:
        resolve_backend("auto", GPU, PROBLEM)
        resolve_backend("auto", GPU, dataclasses.replace(PROBLEM, num_tokens=1))
    assert len(seen) == 1
    assert "triton_dequant: wrong answer" in str(seen[0].message)


def test_auto_decides_once_per_size(fake_gpu):
    for _ in range(3):
        resolve_backend("auto", GPU, PROBLEM)
    assert fake_gpu.probed == ["triton_dequant"] and len(fake_gpu.asked) == 1
    other_size = dataclasses.replace(PROBLEM, num_tokens=1)
    resolve_backend("auto", GPU, other_size)
    assert len(fake_gpu.asked) == 2 and fake_gpu.probed == ["triton_dequant"]


def test_reprobe_forgets_the_verdicts(fake_gpu, monkeypatch):
    forgotten = []
    monkeypatch.setattr(probe, "forget", lambda: forgotten.append(True))
    resolve_backend("auto", GPU, PROBLEM)
    registry.reprobe()
    resolve_backend("auto", GPU, PROBLEM)
    assert forgotten == [True] and fake_gpu.probed == ["triton_dequant", "triton_dequant"]


def test_auto_never_picks_bf16(fake_gpu, recwarn):
    fake_gpu.verdicts.update(triton_dequant="broken", triton_scaled="broken")
    fake_gpu.preference = "bf16"  # even when a table says it is fastest
    assert resolve_backend("auto", GPU, PROBLEM).name == "torch"
    assert "bf16" not in fake_gpu.probed


def test_auto_follows_the_tuned_table(fake_gpu):
    fake_gpu.preference = "triton_scaled"
    assert resolve_backend("auto", GPU, PROBLEM).name == "triton_scaled"
    assert fake_gpu.asked == [(settings.DeviceFacts("cuda", "Fake GPU 80GB", (9, 0), 132, False),
                               64, 2880, 2880, 32, 4)]


def test_auto_falls_back_when_the_tables_choice_is_unusable(fake_gpu):
    fake_gpu.preference = "triton_scaled"
    fake_gpu.verdicts["triton_scaled"] = "CompilationError"
    assert resolve_backend("auto", GPU, PROBLEM).name == "triton_dequant"


@pytest.mark.parametrize("preference", [None, "no_such_backend"])
def test_auto_ignores_a_table_without_a_usable_opinion(fake_gpu, preference):
    fake_gpu.preference = preference
    assert resolve_backend("auto", GPU, PROBLEM).name == "triton_dequant"


def test_auto_without_a_problem_does_not_ask_the_table(fake_gpu):
    assert resolve_backend("auto", GPU).name == "triton_dequant"
    assert fake_gpu.asked == []


def test_backends_on_a_gpu_reports_probe_verdicts(fake_gpu):
    fake_gpu.verdicts["bf16"] = "the probe child timed out after 180 s"
    table = mxmoe.backends(GPU)
    assert table == {"torch": (True, ""), "triton_dequant": (True, ""),
                     "triton_scaled": (True, ""),
                     "bf16": (False, "the probe child timed out after 180 s")}
    statuses = {s.name: s for s in registry.backend_statuses(GPU)}
    assert statuses["torch"].probe is None and statuses["bf16"].probe.reason.startswith("the")


def test_static_failure_on_a_gpu_skips_the_probe(fake_gpu, interpret):
    interpret(True)  # Triton then runs on the CPU only
    assert not mxmoe.backends(GPU)["triton_dequant"][0]
    assert fake_gpu.probed == []


# --------------------------------------------------------------------------- mxmoe info


def test_info_prints_the_backend_table(capsys, interpret, monkeypatch):
    from mxmoe.cli import main

    interpret(False)
    monkeypatch.setattr(registry, "_default_device", lambda: CPU)  # no real probe on a GPU box
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend" in out and "probe" in out and "max err" in out
    for name in registry.BACKEND_NAMES:
        assert name in out
    assert "probe cache:" in out


def test_info_shows_probe_source_and_error(capsys, fake_gpu, monkeypatch):
    from mxmoe.cli import main

    monkeypatch.setattr(registry, "_default_device", lambda: GPU)
    assert main(["info"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("triton_dequant"))
    assert row.split()[1:4] == ["yes", "fresh", "1.00e-03"]


# --------------------------------------------------------------------------- registry + real probe


def test_simulated_gpu_through_the_real_probe_machinery(tmp_path, monkeypatch):
    """backends() and auto on 'cuda:0' with the real probe, cache and judge; only the child
    (a script: triton_dequant answers, triton_scaled aborts, bf16 prints garbage) is fake."""
    script = tmp_path / "child.py"
    script.write_text(
        "import json, os, sys\n"
        "name = sys.argv[1]\n"
        "if name == 'triton_scaled':\n"
        "    os.abort()\n"
        "result = {'backend': name, 'ok': True, 'max_rel_err': 2e-3, 'reason': ''}\n"
        "print('MXMOE_PROBE_RESULT', json.dumps(result) if name != 'bf16' else '{', flush=True)\n"
    )
    runs = []

    def child_command(name, device):
        runs.append(name)
        return [sys.executable, str(script), name]

    set_interpret(monkeypatch, False)
    monkeypatch.setattr(probe, "probe_key", lambda device: ("sim", {"device": "Simulated"}))
    monkeypatch.setattr(probe, "child_command", child_command)
    monkeypatch.setattr(kernel_configs, "fastest_backend", lambda *args: None)
    monkeypatch.setattr(settings, "device_facts", lambda device: settings.DeviceFacts(
        "cuda", "Simulated", (9, 0), 132, False))
    probe.forget(cache_file=False)
    try:
        assert resolve_backend("auto", GPU, PROBLEM).name == "triton_dequant"
        assert runs == ["triton_dequant"]
        table = mxmoe.backends(GPU)
        assert table["triton_dequant"] == (True, "")
        assert not table["triton_scaled"][0] and "SIGABRT" in table["triton_scaled"][1]
        assert not table["bf16"][0] and "not JSON" in table["bf16"][1]
        assert runs == ["triton_dequant", "triton_scaled", "bf16"]
        assert (tmp_path / "cache" / probe.CACHE_FILE_NAME).exists()
    finally:
        probe.forget(cache_file=False)


def test_ptx_conversion_only_for_compiled_bf16_on_nvidia(monkeypatch):
    """The PTX nibble conversion is never chosen where it cannot run: the interpreter, a CPU
    tensor, fp16/fp32 dots, an AMD GPU, or with MXMOE_DEQUANT_PTX=0. (Setting TRITON_INTERPRET
    here changes only mxmoe's view of it: `triton.jit` read it when the kernels were imported.)"""
    import mxmoe.kernels.fused_moe as fm

    cuda = torch.device("cuda")
    hopper = settings.DeviceFacts("cuda", "Fake GPU", (9, 0), 132, False)
    monkeypatch.setattr(settings, "device_facts", lambda device: hopper)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # mxmoe's switch only: kernels are imported
    assert not fm.use_dequant_ptx(torch.device("cpu"), torch.bfloat16)
    assert not fm.use_dequant_ptx(cuda, torch.float16)
    assert not fm.use_dequant_ptx(cuda, torch.float32)
    monkeypatch.setenv("MXMOE_DEQUANT_PTX", "0")
    assert not fm.use_dequant_ptx(cuda, torch.bfloat16)
    monkeypatch.delenv("MXMOE_DEQUANT_PTX")
    assert fm.use_dequant_ptx(cuda, torch.bfloat16)
    monkeypatch.setattr(settings, "device_facts", lambda device: dataclasses.replace(
        hopper, is_hip=True))
    assert not fm.use_dequant_ptx(cuda, torch.bfloat16)
    monkeypatch.setattr(settings, "device_facts", lambda device: hopper)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not fm.use_dequant_ptx(cuda, torch.bfloat16)
