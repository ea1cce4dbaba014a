import os, sys, time, tempfile
from pathlib import Path
os.environ["MKL_CBWR"]="AUTO,STRICT"
import diffusers; diffusers.utils.logging.set_verbosity_error()
import httpx
from loadtest import bench, service
from loadtest.adapter_timing import build_pipeline
from serve.loras.synthetic import lora_tensors, write_lora
args = bench.parse_args([])
work = Path(tempfile.mkdtemp()); pipe = build_pipeline("bench", bench.BENCH_DEPTH); pipe.save_pretrained(work/"m")
names=[]
for i in range(32):
    n=f"b{i:02d}.safetensors"; write_lora(work/"l"/n, lora_tensors(pipe.transformer,"transformer",i,16,bench.ATTENTION_MLP_TARGETS)); names.append(n)
del pipe
url = service.start(10, {n: os.environ.get(n,"1") for n in service.ENV_PASSED})
try:
    bench.deploy("x", work/"m", work/"l", args, 1)
    body = {"prompt": bench.PROMPT, "width": 256, "height": 256, "steps": 2, "cfg": 3.5}
    ch = bench.zipf_choices(16+32+32, 32, 1.1, 0)
    bodies = [{**body, "seed": i, "lora_name": names[k]} for i,k in enumerate(ch)]
    with httpx.Client(base_url=url, timeout=600) as c:
        bench.run_workload(c, bodies[:16], 4)
        for clients, part in ((1, bodies[16:48]), (4, bodies[48:])):
            s, rs = bench.run_workload(c, part, clients)
            inf = sum(float(r.headers["X-Inference-Ms"]) for r in rs)/1000
            print(clients, "clients", len(part)/s, "req/s; inference share", inf/s, "hits", sum(r.headers["X-LoRA-Cache"]=="hit" for r in rs), flush=True)
finally:
    service.stop()
