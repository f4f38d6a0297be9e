"""The benchmark loop: for each model and M, check every path against the fp32 reference, then
time it beside the layer's floor, and measure its host cost (eager call) beside the bare cost of
as many launches. One failing path is recorded and the run goes on.

Paths: mxmoe backend names and ``auto`` (route + `fused_experts`), ``baseline`` (plain torch,
dense weights), ``triton_kernels`` (the peer, `peers`), ``layer`` (`MXFP4MoE` with the default
backend, its own router included: checked against the reference routed from its router's
logits). The baseline, the peer and the layer are made once per model. Every path is timed
with gradients off (`torch.no_grad`), as inference runs it.
"""

from __future__ import annotations


import math
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..api import fused_experts
from ..testing import poison_, relative_error
from ..tolerances import tolerance_for
from ..reference import fused_experts_reference
from ..router import route
from . import report
from .baseline import DenseBaseline
from .ceilings import Ceilings
from ..layouts import LAYOUTS
from .floors import Floor, dense_expert_bytes, layer_floor
from .host import HostCost, HostMeter, skipped
from .peers import TRITON_KERNELS, PeerUnavailable, TritonKernelsLayer
from .problems import (Inputs, ModelShape, Rotations, Weights, make_rotations, make_weights,
                       torch_route)
from .timing import (RepPolicy, Timing, capture_graphs, host_sync_reason, time_cpu,
                     time_eager_cuda, time_graphs)

#: The path name that selects the plain-torch bf16-weights baseline.
BASELINE = "baseline"
#: The path name of the `MXFP4MoE` layer (router included, default backend); its row label.
LAYER = "layer"
LAYER_LABEL = "MXFP4MoE"
#: `MXFP4MoE` with its weights held in another layout than the one "auto" picks
#: (`mxmoe.backends.fastest_layout`): "layer@plain", "layer@group_halves", "layer@mma_lanes".
LAYER_IN = {name: f"{LAYER}@{name}" for name in LAYOUTS}
#: `fused_experts(backend="auto")` on the weights converted to another layout (the rotations'
#: routing, like "auto" and the peer): "auto@group_halves", "auto@mma_lanes".
AUTO_IN = {name: f"auto@{name}" for name in LAYOUTS if name != "plain"}
#: Paths that are not mxmoe backend names.
EXTRA_PATHS = ("auto", BASELINE, TRITON_KERNELS, LAYER, *LAYER_IN.values(), *AUTO_IN.values())
LAYER_PATHS = (LAYER, *LAYER_IN.values())


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    models: list[ModelShape]
    tokens: list[int]
    paths: list[str]  # mxmoe backend names, "auto", "baseline"
    rotations: int = 4
    policy: RepPolicy = field(default_factory=RepPolicy)
    #: None: `mxmoe.testing.tolerance_for` each path (the policy of `mxmoe check`).
    tolerance: float | None = None
    json_path: Path | None = None  # rewritten after every M, so a cut-off run keeps its rows
    time_limit_s: float | None = None  # start no new (model, M) point after this long
    host: bool = True  # measure the host cost of an eager call (on a GPU)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "tokens": list(self.tokens),
            "paths": list(self.paths),
            "rotations": self.rotations,
            "budget_s": self.policy.budget_s,
            "tolerance": self.tolerance,
            "host": self.host,
        }


class ContextLost(RuntimeError):
    """The CUDA context is unusable (a kernel faulted): nothing more can run in this process."""

    def __init__(self, message: str, row: dict | None = None):
        super().__init__(message)
        self.row = row


class _OutOfTime(RuntimeError):
    """`Settings.time_limit_s` has passed: stop cleanly, keep what was measured."""


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:300]


def _cuda_alive(device: torch.device) -> bool:
    """Whether CUDA work still runs. Tried twice: a failed capture can leave a non-sticky error
    that the first call reads (and so clears); a faulted kernel's error never clears."""
    for _ in range(2):
        try:
            torch.cuda.synchronize(device)
            if float(torch.ones(1, device=device).sum()) == 1.0:
                return True
        except Exception:
            pass
    return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend_layer(name: str, weights: Weights) -> Callable[[Inputs], torch.Tensor]:
    """The whole layer through `mxmoe`: route the logits, then `fused_experts` on ``name``."""
    top_k = weights.model.top_k

    def layer(inputs: Inputs) -> torch.Tensor:
        topk_weights, topk_ids = route(inputs.router_logits, top_k)
        return fused_experts(
            inputs.hidden_states, weights.w13, weights.w2, topk_weights, topk_ids,
            w13_bias=weights.w13_bias, w2_bias=weights.w2_bias, activation="swigluoai",
            backend=name,
        )

    return layer


class MoELayerPath:
    """`MXFP4MoE` (router + experts, ``backend="auto"``) on the benchmark's weights:
    ``layer(inputs)`` takes the activations only; `reference` routes from its router."""

    label = LAYER_LABEL

    def __init__(self, weights: Weights, layout: str = "auto"):
        from ..layer import MXFP4MoE

        self.weights = weights
        self.label = LAYER_LABEL if layout == "auto" else f"{LAYER_LABEL}@{layout}"
        self.module = MXFP4MoE(weights.w13, weights.w2, weights.router_weight,
                               weights.router_bias, weights.w13_bias, weights.w2_bias,
                               top_k=weights.model.top_k, layout=layout)

    def __call__(self, inputs: Inputs) -> torch.Tensor:
        return self.module(inputs.hidden_states)

    def reference(self, inputs: Inputs) -> torch.Tensor:
        w = self.weights
        logits = torch.nn.functional.linear(inputs.hidden_states.to(torch.float32),
                                            w.router_weight, w.router_bias)
        topk_weights, topk_ids = torch_route(logits, w.model.top_k)
        return fused_experts_reference(inputs.hidden_states, w.w13, w.w2, topk_weights,
                                       topk_ids, w13_bias=w.w13_bias, w2_bias=w.w2_bias)


def _auto_detail(device: torch.device) -> str:
    from ..backends import resolve_backend

    try:
        return f"auto -> {resolve_backend('auto', device).name}"
    except Exception as exc:
        return f"auto does not resolve: {_one_line(exc)}"


class Runner:
    def __init__(self, settings: Settings, ceilings: Ceilings, environment: dict,
                 log: Callable[[str], None] = print):
        self.s = settings
        self.ceilings = ceilings
        self.log = log
        self.results = report.new_results(environment, ceilings.as_dict(), settings.as_dict(),
                                          {m.name: m.as_dict() for m in settings.models},
                                          settings.notes)
        self._t0 = time.perf_counter()
        #: CUDA graphs and events (else the wall clock). Tests set it to drive the GPU branch
        #: with fakes on the CPU.
        self.gpu = settings.device.type == "cuda"
        self._traced: set[str] = set()  # paths whose first traceback was printed
        self._dense_floor: Floor | None = None  # of the current point
        #: Made on first use on a GPU; tests put a fake here to drive the host-cost branch.
        self.host_meter: HostMeter | None = None

    # -- bookkeeping -------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.log(f"[{time.perf_counter() - self._t0:7.1f}s] {text}")

    def _save(self) -> None:
        if self.s.json_path is not None:
            report.write_json(self.results, self.s.json_path)

    def _failed(self, row: dict, path: str, exc: BaseException) -> None:
        row["status"] = "error"
        row["error"] = _one_line(exc)
        if path not in self._traced:  # the full story once per path; one line after that
            self._traced.add(path)
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.log("    " + "\n    ".join(tb.rstrip().splitlines()[-12:]))

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            for model in self.s.models:
                try:
                    self._run_model(model)
                except (ContextLost, _OutOfTime):
                    raise
                except Exception as exc:  # e.g. out of memory making the weights
                    self._say(f"{model.name}: skipped the rest of this model: {_one_line(exc)}")
                    if self.gpu and not _cuda_alive(self.s.device):
                        raise ContextLost(f"the CUDA context died in {model.name}") from exc
        except (ContextLost, _OutOfTime) as exc:
            self.results["aborted"] = str(exc)
            self._say(f"STOPPED: {exc}")
        except KeyboardInterrupt:
            self.results["aborted"] = "interrupted"
            self._say("STOPPED: interrupted")
        self.results["complete"] = "aborted" not in self.results
        self._save()
        return self.results

    def _run_model(self, model: ModelShape) -> None:
        s = self.s
        dtype = str(s.dtype).replace("torch.", "")
        self._say(f"{model.name}: H={model.hidden} I={model.inter} E={model.experts} "
                  f"k={model.top_k}, {dtype} activations, making weights")
        weights = make_weights(model, s.dtype, s.device)
        built: dict[str, object] = {}  # path -> its layer object, or the exception making it
        try:
            for m in s.tokens:
                elapsed = time.perf_counter() - self._t0
                if s.time_limit_s is not None and elapsed > s.time_limit_s:
                    raise _OutOfTime(f"time limit ({s.time_limit_s:g} s) reached after "
                                     f"{elapsed:.0f} s, before {model.name} M={m}")
                rotations = make_rotations(model, m, s.rotations, s.dtype, s.device)
                floor_args = dict(
                    num_tokens=m, hidden=model.hidden, inter=model.inter, top_k=model.top_k,
                    touched_experts=rotations.mean_touched_experts,
                    bias_itemsize=weights.w13_bias.element_size(),
                    copy_bytes_per_s=self.ceilings.copy_bytes_per_s,
                    matmul_flops_per_s=self.ceilings.matmul_flops_per_s,
                )
                floor = layer_floor(**floor_args)
                # What the same layer could do with dense weights (the baseline's own floor).
                self._dense_floor = layer_floor(**floor_args, bytes_per_expert=dense_expert_bytes(
                    model.hidden, model.inter, weights.w13_bias.element_size()))
                first = rotations.inputs[0]
                try:
                    reference = fused_experts_reference(
                        first.hidden_states, weights.w13, weights.w2, first.topk_weights,
                        first.topk_ids, w13_bias=weights.w13_bias, w2_bias=weights.w2_bias,
                    )
                except Exception as exc:
                    self._say(f"{model.name} M={m}: the fp32 reference failed, nothing is "
                              f"checked or timed at this M: {_one_line(exc)}")
                    for path in s.paths:
                        row = self._row(model, m, path, floor, rotations)
                        row["error"] = f"reference failed: {_one_line(exc)}"
                        self._add(row)
                    self._save()
                    continue
                for path in s.paths:
                    made = self._build(path, weights, built)
                    if isinstance(made, BaseException):
                        row = self._row(model, m, self._label(path, None), floor, rotations)
                        if isinstance(made, PeerUnavailable):
                            row["status"], row["error"] = "skipped", str(made)
                        else:
                            self._failed(row, path, made)
                        self._add(row)
                        continue
                    try:
                        row = self._measure(model, m, path, weights, made, rotations,
                                            floor, reference)
                    except ContextLost as exc:
                        if exc.row is not None:
                            self._add(exc.row)
                        raise
                    self._add(row)
                del rotations, reference, first
                self._save()
                if self.gpu:
                    torch.cuda.empty_cache()
        finally:
            built.clear()
            del weights
            try:
                from ..backends.triton import clear_dense_cache

                clear_dense_cache()
            except ImportError:
                pass
            if self.gpu:
                torch.cuda.empty_cache()

    def _build(self, path: str, weights: Weights, built: dict):
        """The per-model object of ``path`` (made once, kept in ``built``), None for the paths
        that need none, or the exception that making it raised."""
        makers = {BASELINE: lambda: DenseBaseline(weights, self.s.dtype),
                  TRITON_KERNELS: lambda: TritonKernelsLayer(weights, self.s.dtype),
                  LAYER: lambda: MoELayerPath(weights),
                  **{path: (lambda name=name: MoELayerPath(weights, name))
                     for name, path in LAYER_IN.items()},
                  **{path: (lambda name=name: replace(
                      weights, w13=weights.w13.to_layout(name), w2=weights.w2.to_layout(name)))
                     for name, path in AUTO_IN.items()}}
        if path not in makers:
            return None
        if path not in built:
            try:
                built[path] = makers[path]()
            except Exception as exc:
                built[path] = exc
        return built[path]

    @staticmethod
    def _label(path: str, made) -> str:
        if path == BASELINE:
            return made.label if made is not None and not isinstance(made, BaseException) \
                else "baseline"
        if path in LAYER_PATHS and made is not None and not isinstance(
                made, BaseException):
            return made.label
        return {LAYER: LAYER_LABEL}.get(path, path)

    def _add(self, row: dict) -> None:
        self.results["rows"].append(row)
        self.log(report.format_row(row, self._t0))

    def _row(self, model: ModelShape, m: int, backend: str, floor: Floor,
             rotations: Rotations) -> dict:
        return {
            "model": model.name,
            "M": m,
            "backend": backend,
            "ms": None,
            "floor_ms": floor.seconds * 1e3,
            "ratio": None,
            "max_rel_err": None,
            "graph": False,
            "status": "error",
            "error": None,
            "detail": "",
            "reps": 0,
            "ms_min": None,
            "ms_p90": None,
            "ms_batch_mean": None,
            "bound": floor.bound,
            "floor_memory_ms": floor.memory_seconds * 1e3,
            "floor_compute_ms": floor.compute_seconds * 1e3,
            "floor_dense_ms": self._dense_floor.seconds * 1e3 if self._dense_floor else None,
            "touched_experts": rotations.mean_touched_experts,
            "rotations": len(rotations.inputs),
            "disjoint_rotations": rotations.disjoint_experts,
            "dtype": str(self.s.dtype).replace("torch.", ""),
            **HostCost().as_row(),
        }

    def _host_cost(self, fn, inputs: list[Inputs], timing: Timing) -> HostCost:
        if not self.s.host:
            return skipped("not measured (--no-host)")
        if not self.gpu:
            return skipped("no GPU: the work runs on the host, the call's wall time is its ms")
        if self.host_meter is None:
            self.host_meter = HostMeter(self.s.device)
        try:
            return self.host_meter.measure(fn, inputs, timing.ms / 1e3 + 1e-4)
        except Exception as exc:
            if not _cuda_alive(self.s.device):
                raise
            return skipped(f"host cost failed: {_one_line(exc)}")

    # Gradients off, as an inference server runs a layer (transformers' generate does the
    # same): with them on, a router whose weight is a Parameter makes every path's eager call
    # build an autograd graph (and `fused_experts` then go through its differentiable
    # operator), which is training's cost, not serving's.
    @torch.no_grad()
    def _measure(self, model: ModelShape, m: int, path: str, weights: Weights, made,
                 rotations: Rotations, floor: Floor, reference: torch.Tensor) -> dict:
        s = self.s
        device = s.device
        row = self._row(model, m, self._label(path, made), floor, rotations)
        inputs = rotations.inputs
        graphs, outputs = [], []
        try:
            if path == BASELINE:
                made.select(inputs[0])
                row["backend"] = made.label
                row["detail"] = "; ".join([made.method, *made.notes])
                fn = made
            elif path == TRITON_KERNELS:
                row["detail"] = made.detail
                fn = made
            elif path in LAYER_PATHS:
                reference = made.reference(inputs[0])
                row["detail"] = (f"router included; {_auto_detail(device)}; weights in "
                                 f"{made.module.weight_layout.name}")
                if rotations.disjoint_experts:
                    row["detail"] += "; its own router: rotations not expert-disjoint"
                fn = made
            elif path in AUTO_IN.values():
                fn = backend_layer("auto", made)
                row["detail"] = f"{_auto_detail(device)}; weights in {made.w13.layout.name}"
            else:
                fn = backend_layer(path, weights)
                if path == "auto":
                    row["detail"] = _auto_detail(device)

            # Correct first: the first call also compiles and autotunes.
            t0 = time.perf_counter()
            out = fn(inputs[0])
            _sync(device)
            first_call_s = time.perf_counter() - t0
            errors = [relative_error(out, reference)]
            del out

            timing: Timing
            if self.gpu:
                why_not = host_sync_reason(fn, inputs[0])
                if why_not is None:
                    try:
                        graphs, outputs = capture_graphs(fn, inputs)
                    except Exception as exc:
                        graphs, outputs = [], []
                        if not _cuda_alive(device):
                            raise
                        why_not = f"capture failed: {_one_line(exc)}"
                if graphs:
                    poison_(outputs[0])  # a replay that skips an element shows it
                    graphs[0].replay()
                    _sync(device)
                    errors.append(relative_error(outputs[0], reference))
                    timing = time_graphs(graphs, s.policy)
                else:
                    row["detail"] = "; ".join(x for x in (row["detail"], f"eager: {why_not}") if x)
                    timing = time_eager_cuda(fn, inputs, s.policy)
            else:
                timing = time_cpu(fn, inputs, s.policy, estimate=first_call_s)

            row.update(self._host_cost(fn, inputs, timing).as_row())
            err = max(errors)
            row.update(ms=timing.ms, ms_min=timing.ms_min, ms_p90=timing.ms_p90,
                       ms_batch_mean=timing.ms_batch_mean, reps=timing.reps, graph=timing.graph,
                       ratio=timing.ms / row["floor_ms"] if row["floor_ms"] else None)
            if math.isfinite(err):
                row["max_rel_err"] = err
                tolerance = (s.tolerance if s.tolerance is not None
                             else tolerance_for(path, s.dtype))
                row["status"] = "ok" if err <= tolerance else "FAIL"
            else:
                row["status"] = "FAIL"
                row["error"] = "output has NaN or Inf (or elements never written)"
        except Exception as exc:
            self._failed(row, path, exc)
            if self.gpu and not _cuda_alive(device):
                raise ContextLost(
                    f"the CUDA context died in {path} at {model.name} M={m} ({row['error']}); "
                    f"rerun without it (--backends ...) to measure the rest", row
                ) from exc
        finally:
            del graphs, outputs  # frees the graphs' private memory pools ...
            if self.gpu and _cuda_alive(device):
                torch.cuda.empty_cache()  # ... for the next path's graphs
        return row
