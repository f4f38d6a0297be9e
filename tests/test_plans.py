"""Plans kept across calls (`mxmoe.plans`) and planned launches (`mxmoe.kernels.launch`).

A plan is made from a call's signature once and reused: the second call of a signature must
validate nothing, compute from its own tensors (never the first call's), and a call whose
signature differs in anything validation or the kernels look at must get its own plan (or its
error). The direct launch (addresses as ints, GPU only) must pass exactly the arguments the
launch with tensors passes: checked here on the CPU with a stand-in compiled kernel.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

import mxmoe
from mxmoe import plans, settings
from mxmoe.kernels import launch
from mxmoe.kernels.launch import LaunchPlan, Launcher, Ref, Step, Workspace
from mxmoe.reference import fused_experts_reference

from helpers import make_moe, rel_err


def _reference(kw):
    args = {k: v for k, v in kw.items() if k != "backend"}
    return fused_experts_reference(**args)


@pytest.fixture
def counted_validation(monkeypatch):
    """Counts the validations `mxmoe.plans` runs (one per plan made)."""
    calls = []
    real = plans.check_fused_experts_args

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(plans, "check_fused_experts_args", counting)
    plans.clear()
    return calls


@pytest.mark.interpreter
def test_second_call_of_a_signature_reuses_the_plan_on_its_own_tensors(counted_validation):
    first = make_moe(3, 64, 32, 4, 2, dtype=torch.float16, seed=1)
    second = make_moe(3, 64, 32, 4, 2, dtype=torch.float16, seed=2)
    out1 = mxmoe.fused_experts(**first, backend="triton_dequant")
    out2 = mxmoe.fused_experts(**second, backend="triton_dequant")
    assert len(counted_validation) == 1
    assert rel_err(out1, _reference(first)) < 2e-3
    assert rel_err(out2, _reference(second)) < 2e-3
    assert not torch.equal(out1, out2)


@pytest.mark.parametrize("change", ["tokens", "dtype", "strided input", "bias dropped",
                                    "alpha", "activation name", "backend", "layout"])
def test_a_different_signature_gets_its_own_plan(counted_validation, change):
    kw = make_moe(3, 64, 32, 4, 2, seed=1)
    kw["backend"] = "torch"
    mxmoe.fused_experts(**kw)
    other = dict(kw)
    if change == "tokens":
        other = make_moe(5, 64, 32, 4, 2, seed=1)
        other["backend"] = "torch"
    elif change == "dtype":
        other["hidden_states"] = kw["hidden_states"].to(torch.float16)
        other["w13_bias"] = kw["w13_bias"].to(torch.float16)
        other["w2_bias"] = kw["w2_bias"].to(torch.float16)
    elif change == "strided input":
        wide = torch.zeros(3, 128)
        wide[:, ::2] = kw["hidden_states"]
        other["hidden_states"] = wide[:, ::2]
    elif change == "bias dropped":
        other["w2_bias"] = None
    elif change == "alpha":
        other["alpha"] = 1.5
    elif change == "activation name":
        other["activation"] = mxmoe.Activation.SWIGLUOAI
    elif change == "backend":
        other["backend"] = "auto"
    elif change == "layout":
        other["w13"] = kw["w13"].to_layout("group_halves")
    out = mxmoe.fused_experts(**other)
    assert len(counted_validation) == 2
    assert out.dtype == other["hidden_states"].dtype
    # The torch backend computes in float32 and rounds once to the output dtype.
    assert rel_err(out, _reference(other)) < (1e-3 if out.dtype == torch.float16 else 1e-5)


def test_a_bad_call_raises_after_a_good_one_of_a_similar_signature(counted_validation):
    kw = make_moe(3, 64, 32, 4, 2, seed=1)
    kw["backend"] = "torch"
    mxmoe.fused_experts(**kw)
    bad = dict(kw, w2_bias=kw["w2_bias"][:, :-1])
    with pytest.raises(ValueError, match="w2_bias"):
        mxmoe.fused_experts(**bad)
    bad = dict(kw, topk_ids=kw["topk_ids"].to(torch.int16))
    with pytest.raises(TypeError, match="topk_ids"):
        mxmoe.fused_experts(**bad)


def test_data_checks_run_on_every_call_of_a_planned_signature(counted_validation):
    kw = make_moe(3, 64, 32, 4, 2, seed=1)
    kw["backend"] = "torch"
    mxmoe.fused_experts(**kw)
    ids = kw["topk_ids"].clone()
    ids[1, 0] = 4  # one past E
    with pytest.raises(ValueError, match="topk_ids"):
        mxmoe.fused_experts(**dict(kw, topk_ids=ids))
    assert len(counted_validation) == 1


def test_settings_refresh_makes_plans_again(counted_validation):
    kw = make_moe(3, 64, 32, 4, 2, seed=1)
    kw["backend"] = "torch"
    mxmoe.fused_experts(**kw)
    settings.refresh()
    mxmoe.fused_experts(**kw)
    assert len(counted_validation) == 2


def test_a_copied_weight_computes_its_own_signature():
    kw = make_moe(2, 64, 32, 4, 2)
    w13 = kw["w13"]
    mxmoe.fused_experts(**dict(kw, backend="torch"))
    assert w13._signature is not None
    assert copy.deepcopy(w13)._signature is None
    assert copy.copy(w13)._signature is None


# ----------------------------------------------------------------------- planned launches


class _RecordingCompiled:
    """A compiled kernel stand-in: records the arguments of each direct launch."""

    function = "fn"
    packed_metadata = "meta"

    def __init__(self):
        self.launches = []

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, leave,
            *args):
        self.launches.append(((gx, gy, gz), stream, args))


def test_direct_launches_pass_the_arguments_of_the_tensor_launch(monkeypatch):
    """Two steps over the call's tensors and a workspace: the direct launch's argument list
    equals, position by position, the tensor launch's with each tensor replaced by its
    address (views into the workspace at their offsets)."""
    def kernel(a_ptr, b_ptr, n, scale, BLOCK: int):  # a stand-in: only arg_names matter
        raise AssertionError("not launched")

    kernel.arg_names = ["a_ptr", "b_ptr", "n", "scale", "BLOCK"]
    launcher = Launcher(kernel)
    launcher._names = tuple(kernel.arg_names)
    compiled = _RecordingCompiled()
    seen = []

    def launch_with(grid, named):
        seen.append(named)
        return compiled

    monkeypatch.setattr(launcher, "launch_and_return_compiled", launch_with)
    monkeypatch.setattr(launch, "_RUNTIME", (types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: 7),
        types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)))
    monkeypatch.setattr(settings, "current", lambda: types.SimpleNamespace(interpret=False))

    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    workspace = Workspace(1)
    scratch = workspace.take((5, 3), torch.int32)
    second = workspace.take((2,), torch.float32)
    assert second.offset % launch.WORKSPACE_ALIGN == 0 and second.offset >= 5 * 3 * 4
    plan = LaunchPlan([
        Step(launcher, (4,), dict(a_ptr=Ref.of(0, x), b_ptr=scratch, n=5, scale=0.5, BLOCK=16,
                                  num_warps=4)),
        Step(launcher, (2, 3), dict(a_ptr=second, b_ptr=scratch.plane(2), n=7, scale=1.0,
                                    BLOCK=32)),
    ])
    buffer = torch.zeros(workspace.nbytes, dtype=torch.uint8)
    tensors = [x, buffer]
    plan.run(tensors)  # through the tensors (first run)
    assert len(seen) == 2 and not compiled.launches
    assert seen[0]["b_ptr"].shape == (5, 3) and seen[0]["b_ptr"].dtype == torch.int32
    assert seen[1]["b_ptr"].data_ptr() == buffer.data_ptr() + 2 * 3 * 4
    other_x = x + 1
    other_buffer = torch.zeros_like(buffer)
    plan.run([other_x, other_buffer])  # direct
    assert len(seen) == 2 and len(compiled.launches) == 2
    (grid0, stream0, args0), (grid1, _, args1) = compiled.launches
    assert grid0 == (4, 1, 1) and grid1 == (2, 3, 1) and stream0 == 7
    base = other_buffer.data_ptr()
    assert args0 == (other_x.data_ptr(), base + scratch.offset, 5, 0.5, 16)
    assert args1 == (base + second.offset, base + scratch.offset + 2 * 3 * 4, 7, 1.0, 32)


def test_a_descriptor_step_launches_directly_with_a_descriptor_of_the_calls_tensor(monkeypatch):
    """A plan with a TMA-descriptor step between two plain ones: the first run builds a Triton
    TensorDescriptor of the tensor; later runs launch every step directly, the descriptor
    step with a descriptor of the new call's tensor (its address; the plan's shape, strides
    and box), in the plan's order."""
    tensor_descriptor = pytest.importorskip("triton.tools.tensor_descriptor")
    from mxmoe.kernels.launch import DescriptorRef

    def kernel(a_ptr, n):  # a stand-in: only arg_names matter
        raise AssertionError("not launched")

    kernel.arg_names = ["a_ptr", "n"]
    launcher = Launcher(kernel)
    launcher._names = tuple(kernel.arg_names)
    compiled = _RecordingCompiled()
    seen = []

    def launch_with(grid, named):
        seen.append(named)
        return compiled

    monkeypatch.setattr(launcher, "launch_and_return_compiled", launch_with)
    monkeypatch.setattr(launch, "_RUNTIME", (types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: 7),
        types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)))
    monkeypatch.setattr(settings, "current", lambda: types.SimpleNamespace(interpret=False))

    x = torch.zeros(64, 32, dtype=torch.float16)
    plan = LaunchPlan([Step(launcher, (1,), dict(a_ptr=Ref.of(0, x), n=1)),
                       Step(launcher, (2,), dict(a_ptr=DescriptorRef(Ref.of(0, x), (16, 32)),
                                                 n=2)),
                       Step(launcher, (1,), dict(a_ptr=Ref.of(0, x), n=3))])
    plan.run([x])  # through the tensors (first run)
    assert [named["n"] for named in seen] == [1, 2, 3] and not compiled.launches
    first = seen[1]["a_ptr"]
    assert isinstance(first, tensor_descriptor.TensorDescriptor)
    assert first.base is x and list(first.block_shape) == [16, 32]

    other = torch.zeros_like(x)
    plan.run([other])  # direct, the descriptor step too
    assert len(seen) == 3 and [args[1] for _, _, args in compiled.launches] == [1, 2, 3]
    (_, _, plain_args), (grid, stream, (descriptor, n)), _ = compiled.launches
    assert plain_args == (other.data_ptr(), 1) and grid == (2, 1, 1) and stream == 7
    # What Triton's launcher reads of a host descriptor (make_tensordesc_arg).
    assert descriptor.base.data_ptr() == other.data_ptr()
    assert descriptor.base.dtype == torch.float16
    assert list(descriptor.shape) == [64, 32] and list(descriptor.strides) == [32, 1]
    assert list(descriptor.block_shape) == [16, 32] and descriptor.padding == "zero"


def test_ref_views_read_the_bytes_they_name():
    blocks = torch.arange(2 * 3 * 8, dtype=torch.uint8).reshape(2, 3, 8)
    words = Ref.of(0, blocks).viewed_as(torch.int32)
    assert words.shape == (2, 3, 2) and words.strides == (6, 2, 1)
    got = words.materialize([blocks])
    assert torch.equal(got, blocks.view(torch.int32))
    plane = Ref.of(0, blocks).plane(1).materialize([blocks])
    assert torch.equal(plane, blocks[1])
    with pytest.raises(ValueError, match="cannot view"):
        Ref.of(0, blocks[:, :, :6]).viewed_as(torch.int32)


@pytest.mark.gpu
def test_first_use_tuning_times_candidates_once_and_the_plan_uses_the_winner(monkeypatch,
                                                                            tmp_path):
    from mxmoe import autotune, cache
    from mxmoe.kernels import configs

    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "user-cache"))
    monkeypatch.setenv(autotune.ENV, "1")
    autotune.refresh()
    configs.clear_memo()
    plans.clear()
    timed = []
    real = autotune.maybe_tune

    def counting(key, candidates, time_candidate):
        timed.append(key)
        return real(key, candidates, time_candidate)

    monkeypatch.setattr(autotune, "maybe_tune", counting)
    try:
        kw = make_moe(48, 256, 192, 8, 2, dtype=torch.bfloat16, device="cuda", seed=3)
        out = mxmoe.fused_experts(**kw, backend="triton_dequant")
        again = mxmoe.fused_experts(**kw, backend="triton_dequant")
        assert len(timed) == 1 and autotune.is_tuned(timed[0])
        assert rel_err(out.float(), _reference(kw)) < 2e-2
        assert torch.equal(out, again)
    finally:
        autotune.refresh()
        configs.clear_memo()
        plans.clear()


def test_a_plan_keeps_no_tensor_of_the_call_alive():
    """A cached plan must not keep a model's weights (or any input) alive after it is gone."""
    import gc
    import weakref

    plans.clear()
    kw = make_moe(2, 64, 32, 4, 2, seed=5)
    mxmoe.fused_experts(**kw, backend="torch")
    refs = [weakref.ref(kw["w13"].blocks), weakref.ref(kw["hidden_states"]),
            weakref.ref(kw["topk_ids"])]
    del kw
    gc.collect()
    assert all(r() is None for r in refs)
