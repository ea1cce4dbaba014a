import os, time
os.environ["MKL_CBWR"]="AUTO,STRICT"
import diffusers; diffusers.utils.logging.set_verbosity_error()
import torch
from loadtest import bench
from loadtest.adapter_timing import build_pipeline
from deployments.adapters import PipelineAdapters, ActiveAdapter
from deployments.family import get_family
from serve.loras.synthetic import lora_tensors
args = bench.parse_args([])
pipe = build_pipeline("bench", bench.BENCH_DEPTH); pipe.set_progress_bar_config(disable=True)
fam=get_family("flux"); ad = PipelineAdapters(pipe, fam)
def g(): 
    t=time.perf_counter(); bench.generate(pipe, fam, args, 1); return round((time.perf_counter()-t)*1000)
g(); print("pristine", g(), g())
for i in range(8):
    ad.load(f"a{i}", lora_tensors(pipe.transformer,"transformer",i,16,bench.ATTENTION_MLP_TARGETS), "x")
    ad.activate([ActiveAdapter(f"a{i}",1.0,1.0)])
    print(i+1, "loaded, one active", g(), g())
ad.activate([]); print("none active", g(), g())
