"""`mxmoe::fused_experts` as a PyTorch operator: opcheck, torch.compile(fullgraph=True), gradients.

torch backend on the CPU. Compiles are few and small: aot_eager (no code generation) where the
point is the graph, one inductor compile of the layer. At the end, the Triton backends under
the interpreter and a gpt-oss-20b-shaped layer on the GPU (both need mxmoe.kernels.fused_moe).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.library import opcheck

import mxmoe
import mxmoe.ops  # noqa: F401  (registers torch.ops.mxmoe.*, which these tests call directly)
from mxmoe.reference import fused_experts_reference

from helpers import make_moe, rel_err

H, I, E, K = 64, 32, 4, 2


def _problem(m=5, *, dtype=torch.float32, bias=True, e_global=None, requires_grad=False, seed=0):
    kwargs = make_moe(m, H, I, E, K, dtype=dtype, bias=bias, e_global=e_global, seed=seed)
    if e_global is not None:
        # Global experts 0..E-1 are local 0..E-1; the rest live on other ranks.
        kwargs["expert_map"] = torch.tensor(
            [g if g < E else -1 for g in range(e_global)], dtype=torch.int32
        )
    if requires_grad:
        for name in ("hidden_states", "topk_weights", "w13_bias", "w2_bias"):
            if kwargs[name] is not None:
                kwargs[name].requires_grad_()
    return kwargs


def _op_args(kwargs, *, activation="swigluoai", on_input=False, backend="torch"):
    """The operator's positional arguments for a `fused_experts` keyword dict."""
    from mxmoe.validation import check_fused_experts_args

    call = check_fused_experts_args(
        kwargs["hidden_states"], kwargs["w13"], kwargs["w2"], kwargs["topk_weights"],
        kwargs["topk_ids"], w13_bias=kwargs["w13_bias"], w2_bias=kwargs["w2_bias"],
        activation=activation, alpha=1.702, limit=7.0, expert_map=kwargs.get("expert_map"),
        apply_router_weight_on_input=on_input, backend=backend,
    )
    return call.op_args()


CASES = {
    "biases": dict(),
    "no biases": dict(bias=False),
    "fp16 activations": dict(dtype=torch.float16),
    "expert_map: 2 of 6 experts remote": dict(e_global=6),
    "router weight on input": dict(on_input=True),
    "silu, [gate | up] rows": dict(activation="silu"),
}


def _split(case: dict) -> tuple[dict, dict]:
    problem = {k: v for k, v in case.items() if k not in ("on_input", "activation")}
    scalars = {k: v for k, v in case.items() if k in ("on_input", "activation")}
    return problem, scalars


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_opcheck(case):
    problem, scalars = _split(case)
    opcheck(torch.ops.mxmoe.fused_experts.default, _op_args(_problem(**problem), **scalars))


def test_opcheck_with_gradients():
    """With inputs that require grad opcheck also checks the backward against AOT autograd's."""
    opcheck(torch.ops.mxmoe.fused_experts.default, _op_args(_problem(requires_grad=True)))


def test_opcheck_zero_tokens():
    opcheck(torch.ops.mxmoe.fused_experts.default, _op_args(_problem(m=0)))


def test_fake_implementation_gives_shape_and_dtype_without_data():
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a
            for a in _op_args(_problem(m=7, dtype=torch.float16))]
    out = torch.ops.mxmoe.fused_experts(*args)
    assert out.device.type == "meta" and out.shape == (7, H) and out.dtype == torch.float16


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gradients_match_autograd_through_the_reference(case):
    """The written-out backward against autograd through `fused_experts_reference`."""
    problem, scalars = _split(case)
    kwargs = _problem(**problem, requires_grad=True)
    on_input = scalars.get("on_input", False)
    activation = scalars.get("activation", "swigluoai")
    inputs = [kwargs[n] for n in ("hidden_states", "topk_weights", "w13_bias", "w2_bias")
              if kwargs[n] is not None]
    out = mxmoe.fused_experts(**kwargs, activation=activation,
                              apply_router_weight_on_input=on_input, backend="torch")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    got = torch.autograd.grad(out, inputs, grad_out)
    ref = fused_experts_reference(**kwargs, activation=mxmoe.Activation(activation),
                                  apply_router_weight_on_input=on_input)
    want = torch.autograd.grad(ref, inputs, grad_out.float())
    tol = 1e-2 if problem.get("dtype") == torch.float16 else 1e-5
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and rel_err(g, w) < tol


def test_gradients_are_zero_when_every_expert_is_remote():
    kwargs = _problem(e_global=6, requires_grad=True)
    kwargs["expert_map"] = torch.full((6,), -1, dtype=torch.int32)
    out = mxmoe.fused_experts(**kwargs, backend="torch")
    grads = torch.autograd.grad(out.sum(), [kwargs["hidden_states"], kwargs["topk_weights"]])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_compiled_function_equals_eager():
    kwargs = _problem()

    def f(kwargs):
        return mxmoe.fused_experts(**kwargs, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(kwargs), f(kwargs))


def test_compiled_graph_holds_the_operator():
    """One opaque node, not the reference's Python inlined into the graph."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    kwargs = _problem()
    compiled = torch.compile(lambda kw: mxmoe.fused_experts(**kw, backend="torch"),
                             fullgraph=True, backend=capture)
    compiled(kwargs)
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.mxmoe.fused_experts.default) == 1
    assert torch.ops.aten.nonzero.default not in targets


def test_eager_call_without_dispatcher_equals_the_operator():
    """Eager inference skips the dispatcher (`ops.must_dispatch`); the result is the same."""
    kwargs = _problem()
    direct = mxmoe.fused_experts(**kwargs, backend="torch")
    dispatched = torch.ops.mxmoe.fused_experts(*_op_args(kwargs))
    assert torch.equal(direct, dispatched)


def _layer(seed=0) -> mxmoe.MXFP4MoE:
    g = torch.Generator().manual_seed(seed)
    return mxmoe.MXFP4MoE.from_dense(
        torch.randn(E, H, generator=g), torch.randn(E, generator=g),
        torch.randn(E, 2 * I, H, generator=g) * H**-0.5,
        torch.randn(E, H, I, generator=g) * I**-0.5,
        torch.randn(E, 2 * I, generator=g) * 0.1, torch.randn(E, H, generator=g) * 0.1,
        top_k=K, backend="torch",
    )


@pytest.mark.slow
@torch.no_grad()
def test_compiled_layer_equals_eager_inductor():
    layer = _layer()
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(layer, fullgraph=True)  # inductor: C++ code for the router
    assert rel_err(compiled(x), layer(x)) < 1e-6


def test_compiled_layer_with_gradients_equals_eager():
    layer = _layer()
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(1), requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    got = torch.autograd.grad(out.sum(), [x, layer.router.weight])
    want_out = layer(x)
    want = torch.autograd.grad(want_out.sum(), [x, layer.router.weight])
    assert torch.equal(out, want_out)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@torch.no_grad()
def test_no_recompile_across_token_counts():
    torch._dynamo.reset()  # forget compiles of MXFP4MoE.forward by other tests
    layer = _layer()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for m in (3, 5, 9):
            x = torch.randn(m, H)
            assert torch.equal(compiled(x), layer(x))


@torch.no_grad()
def test_torch_export_holds_the_operator():
    """torch.export traces with fake tensors: the operator is dispatched, never run."""
    layer = _layer()
    x = torch.randn(5, H)
    exported = torch.export.export(layer, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.mxmoe.fused_experts.default) == 1
    assert torch.equal(exported.module()(x), layer(x))


def test_compiled_code_keeps_the_data_checks():
    """The id check reads data, so it runs in the operator: compiled code still raises."""
    kwargs = _problem(m=2)

    def f(kwargs):
        return mxmoe.fused_experts(**kwargs, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(kwargs)
    kwargs["topk_ids"] = torch.tensor([[0, 1], [2, E]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"topk_ids values must be in \[0, 4\)"):
        compiled(kwargs)


# --- Triton backends (need mxmoe.kernels.fused_moe, on another branch until merged) ---------

HAS_KERNELS = importlib.util.find_spec("mxmoe.kernels.fused_moe") is not None
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="mxmoe.kernels.fused_moe not present")


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton_dequant", "triton_scaled"])
@torch.no_grad()
def test_compiled_layer_equals_eager_on_triton_backends_interpreted(backend):
    """fp16: the interpreter computes bf16 wrongly (FACTS)."""
    layer = _layer()
    layer.backend = backend
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(1)).half()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))


def _gpt_oss_20b_layer(backend: str, device) -> mxmoe.MXFP4MoE:
    """gpt-oss-20b's MoE shape (E=32, H=I=2880, k=4) with random codes and sane scales."""
    e, h, i = 32, 2880, 2880
    g = torch.Generator(device=device).manual_seed(0)

    def weight(n, k):
        blocks = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device=device,
                               generator=g)
        scales = torch.randint(118, 122, (e, n, k // 32), dtype=torch.uint8, device=device,
                               generator=g)
        return mxmoe.MXFP4Tensor(blocks, scales)

    return mxmoe.MXFP4MoE(
        weight(2 * i, h), weight(h, i),
        torch.randn(e, h, device=device, generator=g, dtype=torch.bfloat16),
        torch.randn(e, device=device, generator=g, dtype=torch.bfloat16),
        torch.randn(e, 2 * i, device=device, generator=g, dtype=torch.bfloat16) * 0.1,
        torch.randn(e, h, device=device, generator=g, dtype=torch.bfloat16) * 0.1,
        top_k=4, backend=backend,
    )


@needs_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 1000], ids=["M=1 decode", "M=64", "M=1000 prefill"])
@torch.no_grad()
def test_compiled_gpt_oss_20b_layer_equals_eager_on_gpu(m):
    layer = _gpt_oss_20b_layer("auto", "cuda")
    x = torch.randn(m, 2880, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    assert rel_err(compiled(x), layer(x)) < 1e-2


@needs_kernels
@pytest.mark.gpu
@torch.no_grad()
def test_layer_compiled_with_cuda_graph_trees_equals_eager_on_gpu():
    # mode="reduce-overhead" (transformers' static-cache decode) records CUDA graphs whose
    # private pool owns every allocation of the operator's calls: a workspace kept past a call
    # fails the tree's check ("tensor(s) in the cudagraph pool not tracked as outputs").
    layer = _gpt_oss_20b_layer("auto", "cuda")
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for m in (1, 1, 1, 4):  # warm-up, record, replays; then another shape
        x = torch.randn(m, 2880, device="cuda", dtype=torch.bfloat16)
        assert rel_err(compiled(x).clone(), layer(x)) < 1e-2


def test_the_operator_keeps_no_scratch_past_its_call(monkeypatch):
    from mxmoe import plans, scratch

    seen = []
    real = plans.run_call
    monkeypatch.setattr(plans, "run_call", lambda call: seen.append(scratch.kept()) or real(call))
    torch.ops.mxmoe.fused_experts(*_op_args(make_moe(3, 64, 32, 4, 2)))
    assert seen == [False]
    assert scratch.kept()  # and eager calls outside it keep theirs again
