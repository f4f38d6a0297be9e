import os, time, cProfile, pstats, types
os.environ["TRITON_INTERPRET"]="1"
import torch, mxmoe
from mxmoe import settings
from mxmoe.kernels import launch
class FakeCompiled:
    function=None; packed_metadata=None
    def run(self,*a): pass
    def launch_metadata(self,*a): return None
class FakeActive:
    def get_current_device(self): return 0
    def get_current_stream(self, d): return 0
hooks = types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[]), launch_exit_hook=None)
launch.Launcher._direct = lambda self: (FakeActive(), hooks)
orig_call = launch.Launcher.__call__
def call(self, grid, **kw):
    self.kernel = types.SimpleNamespace(__getitem__=None)
    return orig_call(self, grid, **kw)
# make misses return a fake compiled
class K:
    def __getitem__(self, grid): return lambda **kw: FakeCompiled()
for obj in list(vars(__import__('mxmoe.kernels.fused_moe', fromlist=['x'])).values()) + list(vars(__import__('mxmoe.kernels.align', fromlist=['x'])).values()):
    if isinstance(obj, launch.Launcher):
        names = obj._names; obj.kernel = K(); obj._names = names
import dataclasses
real = settings.current()
settings._current = dataclasses.replace(real, interpret=False)
settings.current = lambda: dataclasses.replace(real, interpret=False) if False else settings._current
from mxmoe.testing import random_moe
p = random_moe(1, 2880, 2880, 32, 4, torch.bfloat16, "cpu", seed=0)
kw = p.kwargs(); kw.pop("backend", None)
from mxmoe.validation import check_fused_experts_args
from mxmoe.kernels.fused_moe import fused_moe
from mxmoe.kernels.inner_product import InnerProduct
call_ = check_fused_experts_args(**kw, activation="swigluoai", alpha=1.702, limit=7.0, expert_map=None)
f = lambda: fused_moe(call_, InnerProduct.DEQUANT, "triton_dequant")
for _ in range(20): f()
t=time.perf_counter(); n=2000
for _ in range(n): f()
print("fused_moe per call us", (time.perf_counter()-t)/n*1e6)
g = lambda: check_fused_experts_args(**kw, activation="swigluoai", alpha=1.702, limit=7.0, expert_map=None)
t=time.perf_counter()
for _ in range(n): g()
print("validation per call us", (time.perf_counter()-t)/n*1e6)
t=time.perf_counter()
for _ in range(n): torch.empty((4, 2880), dtype=torch.bfloat16)
print("torch.empty us", (time.perf_counter()-t)/n*1e6)
cProfile.run("for _ in range(2000): f()", "/tmp/prof")
pstats.Stats("/tmp/prof").sort_stats("tottime").print_stats(25)
