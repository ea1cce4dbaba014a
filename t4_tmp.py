import os, time, gc, sys
os.environ["MKL_CBWR"]="AUTO,STRICT"
import diffusers; diffusers.utils.logging.set_verbosity_error()
from loadtest.adapter_timing import build_pipeline
from loadtest.bench import ATTENTION_MLP_TARGETS, BENCH_DEPTH
import deployments.adapters as A
from deployments.base import _resident_memory_mb
from deployments.family import get_family
from serve.loras.synthetic import lora_tensors
mode = sys.argv[1]
if mode != "full":
    A.gc = type("G", (), {"collect": staticmethod(lambda *a: gc.collect(0) if mode=="young" else 0)})
pipe = build_pipeline("bench", BENCH_DEPTH)
ad = A.PipelineAdapters(pipe, get_family("flux"))
ts = [lora_tensors(pipe.transformer, "transformer", i, 16, ATTENTION_MLP_TARGETS) for i in range(10)]
hot=[]
for i in range(8): ad.load(f"s{i}", ts[i%10], "x"); hot.append(f"s{i}")
gc.collect(); r0=_resident_memory_mb()
t=time.perf_counter()
for i in range(80):
    ad.delete(hot.pop(0)); n=f"w{i}"; ad.load(n, ts[i%10], "x"); hot.append(n)
dt=(time.perf_counter()-t)/80
r1=_resident_memory_mb(); gc.collect(); r2=_resident_memory_mb()
print(mode, f"swap {dt*1000:.0f} ms rss {r0:.0f} -> {r1:.0f} (after full gc {r2:.0f}) objects {len(gc.get_objects())}")
