"""Where the time of an eager decode step of a whole gpt-oss-20b goes, on a GPU machine.

`mxmoe bench --model-e2e` measures eager decode tokens/s; at batch 1 the step is host-bound,
and its figure moved between runs (bf16 experts 30-45 ms a step, use_mxmoe 32-64 ms). This
script takes one model, times the decode step (128-token prompt, batch 1 and 8) for
transformers' bf16 experts, then for the same model after `use_mxmoe`, each also with Python's
garbage collector off and with the MoE blocks replaced by a stub that costs nothing (the rest
of the model's step alone), and prints a cProfile of a generate call of each, sorted by own
time (a host synchronisation shows as the time of the call that waits: `item`, `tolist`...).

    PYTHONPATH=src python scripts/e2e_host_profile_gpu.py [--new-tokens 33] [--rows 30]
"""

import argparse
import cProfile
import contextlib
import gc
import io
import pstats
import time

import torch

from mxmoe.bench import e2e
from mxmoe.integrations.transformers import use_mxmoe


class _StubBlock(torch.nn.Module):
    """An MoE block that returns its input: what the step costs without the MoE layers."""

    def __init__(self, experts: int, top_k: int):
        super().__init__()
        self.experts, self.top_k = experts, top_k

    def forward(self, hidden_states):
        scores = hidden_states.new_zeros(hidden_states.shape[:-1].numel(), self.top_k)
        return hidden_states, scores


@contextlib.contextmanager
def _gc_off():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def _stub_blocks(model):
    saved = e2e.moe_blocks(model)
    c = model.config
    e2e._set_moe_blocks(model, [_StubBlock(c.num_local_experts, c.num_experts_per_tok)
                                for _ in saved])
    try:
        yield
    finally:
        e2e._set_moe_blocks(model, saved)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _generate(model, ids, n):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                          max_new_tokens=n, do_sample=False)


def step_ms(model, ids, n) -> float:
    """Milliseconds a decode step: generate(n) minus generate(1), over n - 1 steps."""
    with torch.no_grad():
        _generate(model, ids, 3)
        times = {}
        for count in (1, n):
            _sync()
            start = time.perf_counter()
            _generate(model, ids, count)
            _sync()
            times[count] = time.perf_counter() - start
    return (times[n] - times[1]) / (n - 1) * 1e3


def report(name, model, ids_by_batch, n, rows) -> None:
    layers = model.config.num_hidden_layers
    for batch, ids in ids_by_batch.items():
        plain = step_ms(model, ids, n)
        with _gc_off():
            no_gc = step_ms(model, ids, n)
        with _stub_blocks(model):
            stub = step_ms(model, ids, n)
        print(f"{name} B={batch}: {plain:7.2f} ms/step, gc off {no_gc:7.2f}, "
              f"MoE blocks stubbed {stub:7.2f} (MoE = {plain - stub:6.2f} ms/step, "
              f"{(plain - stub) / layers * 1e3:6.0f} us/layer)", flush=True)
    ids = ids_by_batch[1]
    profiler = cProfile.Profile()
    with torch.no_grad():
        _generate(model, ids, 3)
        _sync()
        profiler.enable()
        _generate(model, ids, 17)
        _sync()
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    print(f"===== cProfile {name}: generate B=1, 17 new tokens\n{text.getvalue()}", flush=True)
    print(f"gc collections so far (per generation): {[s['collections'] for s in gc.get_stats()]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--config", default="20b", help="a key of mxmoe.bench.e2e.MODEL_CONFIGS")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    start = time.perf_counter()
    model = e2e.build_model(args.config, device,
                            torch.bfloat16 if device.type == "cuda" else torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (8, 128), generator=generator)
    ids_by_batch = {1: prompt[:1].to(device), 8: prompt.to(device)}
    print(f"built in {time.perf_counter() - start:.1f} s", flush=True)
    report("transformers bf16", model, ids_by_batch, args.new_tokens, args.rows)
    use_mxmoe(model)
    torch.cuda.empty_cache()
    report("use_mxmoe", model, ids_by_batch, args.new_tokens, args.rows)
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
