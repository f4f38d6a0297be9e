"""Plans kept across calls: what a fused-experts call's signature decides, decided once.

An eager call at decode size does a few tens of microseconds of GPU work; everything the host
does above the kernel launches is overhead that an eager caller (no CUDA graphs) pays on every
call. Almost all of it depends only on the call's *signature*: the types, shapes, strides,
dtypes, devices and 16-byte alignment of its tensors, its parameters (activation, alpha, limit,
apply_router_weight_on_input, backend) and the process's switches (`mxmoe.settings`). That is
the validation, the backend's resolution (``auto``), the config lookup and the backend's launch
plan (`mxmoe.kernels.fused_moe.FusedMoEPlan`: grids, scalars, workspace, compiled kernels).

`run` builds the signature's key from the arguments (metadata only: no tensor data is read and
no tensor is kept), finds its `CallPlan` or makes one (validating the arguments first, so a bad
call raises exactly as before), and runs it. The key holds everything validation looks at, so a
call whose key was validated before is valid. Plans hold no tensors of the call: a plan is a
function of metadata, shared by every layer of the same shapes.

`clear()` forgets every plan (`mxmoe.settings.refresh` calls it; so does a config change that
should take effect in this process, e.g. after `mxmoe tune`).
"""

from __future__ import annotations

import torch

from . import settings
from .backends import resolve_backend
from .format import MXFP4Tensor
from .layouts import MMA_LANES, scales_fold
from .problem import MoECall
from .validation import check_fused_experts_args, check_routing_values, routing_values_checked

__all__ = ["CallPlan", "SignatureCache", "run", "plan_of", "clear", "signature", "tensor_key",
           "weight_key"]

#: Plans kept; past this many (a caller cycling through many shapes) start over.
MAX_PLANS = 512

class SignatureCache:
    """Plans by signature, at most ``limit`` (past it, start over). A key that cannot be hashed
    (an argument validation will reject, or an odd float subclass) is never kept: `get` misses
    it, so the caller validates and says what is wrong."""

    def __init__(self, limit: int):
        self.limit = limit
        self._plans: dict = {}

    def get(self, key):
        try:
            return self._plans.get(key)
        except TypeError:
            return None

    def put(self, key, plan) -> None:
        if len(self._plans) >= self.limit:
            self._plans.clear()
        try:
            self._plans[key] = plan
        except TypeError:
            pass

    def clear(self) -> None:
        self._plans.clear()


_PLANS = SignatureCache(MAX_PLANS)


def clear() -> None:
    """Forget every plan: the next call of each signature plans it again."""
    _PLANS.clear()


def tensor_key(t):
    """What validation and the kernels see of a tensor argument: its metadata, not its data."""
    if type(t) is not torch.Tensor:
        # None, or something validation will reject (it is checked on the miss).
        return type(t)
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15)


#: Each distinct weight metadata seen -> a small int, so that a key holds one int per weight.
_WEIGHT_SIGNATURES: dict = {}


def _weight_key(w):
    if type(w) is not MXFP4Tensor:
        return type(w)
    token = w._signature
    if token is None:
        meta = (tensor_key(w.blocks), tensor_key(w.scales), w.layout.name)
        token = w._signature = _WEIGHT_SIGNATURES.setdefault(meta, len(_WEIGHT_SIGNATURES))
    return token


def weight_key(w) -> tuple:
    """What a call's signature holds of an MXFP4 weight: its metadata's token and the fold
    fact of its scales (a caller keeping a plan checks it is still the same)."""
    return _weight_key(w), _fold_key(w)


def _fold_key(w) -> bool:
    """MMA_LANES weights: whether their scales let the prefill GEMM fold (a fact of the data,
    remembered per tensor version: `layouts.scales_fold`); plans made for one answer are wrong
    for the other, so it is part of the key."""
    return type(w) is MXFP4Tensor and w.layout is MMA_LANES and scales_fold(w.scales)


def signature(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, activation,
              alpha, limit, expert_map, apply_router_weight_on_input, backend) -> tuple:
    """The key of a call: every input's metadata, the parameters with their types, the facts
    of the weights' data that pick a kernel (`_fold_key`), and the process switches'
    generation."""
    return (
        tensor_key(hidden_states), _weight_key(w13), _weight_key(w2), _fold_key(w13),
        _fold_key(w2),
        tensor_key(topk_weights), tensor_key(topk_ids), tensor_key(w13_bias),
        tensor_key(w2_bias), tensor_key(expert_map),
        type(activation), activation, type(alpha), alpha, type(limit), limit,
        apply_router_weight_on_input, backend, settings.generation(),
    )


class CallPlan:
    """Everything one signature decides: the problem, the backend, the backend's runner.

    ``runner(hidden_states, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias, expert_map)``
    is the backend's planned launches (`Backend.plan`), or None: then each call is rebuilt as a
    `MoECall` (cheaply: the problem is known) and handed to ``backend.run``.
    """

    __slots__ = ("problem", "backend", "runner", "check_values", "parameters")

    def __init__(self, call: MoECall):
        problem = call.problem
        self.problem = problem
        self.check_values = routing_values_checked(call.device)
        # The call's parameters only: a plan keeps no tensor (it would keep a model's weights
        # alive after the model is gone).
        self.parameters = dict(alpha=call.alpha, limit=call.limit,
                               apply_router_weight_on_input=call.apply_router_weight_on_input,
                               backend=call.backend)
        if problem.num_tokens == 0 or problem.num_local_experts == 0:
            # No tokens, or (expert parallelism over more ranks than experts) no local experts:
            # nothing to compute, and backends need not handle an empty weight tensor.
            self.backend = None
            self.runner = None
            return
        self.backend = resolve_backend(call.backend, call.device, problem,
                                       call.w13.layout.name)
        self.runner = self.backend.plan(call)

    def __call__(self, hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias,
                 expert_map) -> torch.Tensor:
        problem = self.problem
        if self.check_values:
            check_routing_values(topk_ids, expert_map, problem)
        if self.backend is None:
            return hidden_states.new_zeros((problem.num_tokens, problem.hidden))
        if self.runner is not None:
            return self.runner(hidden_states, topk_weights, topk_ids, w13, w2, w13_bias,
                               w2_bias, expert_map)
        return self.backend.run(MoECall(
            hidden_states=hidden_states, w13=w13, w2=w2, topk_weights=topk_weights,
            topk_ids=topk_ids, w13_bias=w13_bias, w2_bias=w2_bias, expert_map=expert_map,
            problem=problem, **self.parameters,
        ))


def _plan(key, hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, activation,
          alpha, limit, expert_map, apply_router_weight_on_input, backend) -> CallPlan:
    call = check_fused_experts_args(
        hidden_states, w13, w2, topk_weights, topk_ids, w13_bias=w13_bias, w2_bias=w2_bias,
        activation=activation, alpha=alpha, limit=limit, expert_map=expert_map,
        apply_router_weight_on_input=apply_router_weight_on_input, backend=backend,
    )
    plan = CallPlan(call)
    _PLANS.put(key, plan)
    return plan


def run(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, activation, alpha,
        limit, expert_map, apply_router_weight_on_input, backend) -> torch.Tensor:
    """``fused_experts`` in eager mode (not traced, no gradient wanted): the signature's plan,
    made on first use, run on these tensors."""
    plan = plan_of(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias,
                   activation, alpha, limit, expert_map, apply_router_weight_on_input, backend)
    return plan(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map)


def plan_of(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, activation,
            alpha, limit, expert_map, apply_router_weight_on_input, backend) -> CallPlan:
    """The `CallPlan` of these arguments' signature, made (validated) on first use. A caller
    that keeps it may call it on any tensors of the same signature."""
    key = signature(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias,
                    activation, alpha, limit, expert_map, apply_router_weight_on_input, backend)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(key, hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias,
                     activation, alpha, limit, expert_map, apply_router_weight_on_input, backend)
    return plan


def run_call(call: MoECall) -> torch.Tensor:
    """`run` for an already built call."""
    return run(call.hidden_states, call.w13, call.w2, call.topk_weights, call.topk_ids,
               call.w13_bias, call.w2_bias, call.activation, call.alpha, call.limit,
               call.expert_map, call.apply_router_weight_on_input, call.backend)
