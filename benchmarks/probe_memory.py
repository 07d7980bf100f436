"""What holds GPU memory when the decode starts: live blocks grouped by the Python line that allocated them.

The release-sized pipeline of `bench_generate.py` (random weights, bf16, VAE slicing, `max_batch_size=8`) makes
B=1 and B=16 twice each, with CUDA graphs and then eagerly, the prompts encoded outside `__call__` as a user would.
At the first decode of each second call it takes a `torch.cuda.memory._snapshot()` (allocation stacks recorded) and
writes, to $OUT/memory_probe.txt, the memory per allocator pool and the 25 largest allocation sites; it also logs
what each stage's graph capture adds. Needs CUDA.

    OUT=out python3 benchmarks/probe_memory.py
"""
import collections, gc, os, sys
sys.path.insert(0, "benchmarks")
import torch
import bench_generate as bg
from diffusers_hart.pipelines.hart import stage_runner as sr

OUT = os.environ["OUT"]
G = 2**30
log = open(f"{OUT}/memory_probe.txt", "w")
def say(*a):
    print(*a, file=log, flush=True); print(*a, flush=True)

torch.manual_seed(0)
pipe = bg.release_sized_pipeline("adaln_single", torch.bfloat16, "cuda")
pipe.vae.enable_slicing()
say("after build", torch.cuda.memory_allocated() / G)
orig_capture = sr.CUDAGraphStageRunner._capture
def capture(self, si, tokens):
    before = torch.cuda.memory_allocated()
    out = orig_capture(self, si, tokens)
    after = torch.cuda.memory_allocated()
    say(f"capture stage {si}: +{(after - before) / G:.3f} GiB -> {after / G:.2f}")
    return out
sr.CUDAGraphStageRunner._capture = capture

def embeds(B):
    pipe.text_encoder.to("cuda")
    e = pipe.encode_prompt([bg.PROMPT] * B, device="cuda")
    pipe.text_encoder.to("cpu"); torch.cuda.empty_cache()
    names = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
    return dict(zip(names, e))

decode = pipe.vae.decode
state = {"snap": None}
def decode_probe(*a, **k):
    if state["snap"] is None:
        torch.cuda.synchronize()
        state["snap"] = torch.cuda.memory._snapshot()
        state["held"] = torch.cuda.memory_allocated()
    return decode(*a, **k)
pipe.vae.decode = decode_probe

def report(tag):
    snap = state["snap"]
    say(f"== {tag}: allocated at decode start {state['held']/G:.2f} GiB")
    pools = collections.Counter(); pool_total = collections.Counter()
    by_site = collections.Counter(); count = collections.Counter()
    for seg in snap["segments"]:
        pool = str(seg.get("segment_pool_id"))
        pool_total[pool] += seg["total_size"]
        for blk in seg["blocks"]:
            if blk["state"] != "active_allocated":
                continue
            pools[pool] += blk["size"]
            frames = [f for f in blk.get("frames", []) if "diffusers_hart" in f["filename"] or "bench" in f["filename"] or "transformers/" in f["filename"]]
            site = " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in frames[:4]) or "?"
            by_site[site] += blk["size"]; count[site] += 1
    for pool in pools:
        say(f"pool {pool}: active {pools[pool]/G:.2f} GiB of {pool_total[pool]/G:.2f} reserved")
    for site, size in by_site.most_common(25):
        say(f"{size/G:8.3f} GiB  x{count[site]:5d}  {site}")

torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
for graphs in (True, False):
    pipe.disable_cuda_graphs(); gc.collect(); torch.cuda.empty_cache()
    if graphs:
        pipe.enable_cuda_graphs()
    for B in (1, 16):
        kw = embeds(B)
        for it in range(2):
            state["snap"] = None
            torch.cuda.reset_peak_memory_stats()
            pipe(generator=torch.Generator().manual_seed(it), guidance_scale=4.5, more_smooth=True, output_type="pt", max_batch_size=8, **kw)
            torch.cuda.synchronize()
            say(f"graphs={graphs} B={B} call {it}: peak {torch.cuda.max_memory_allocated()/G:.2f} GiB, after {torch.cuda.memory_allocated()/G:.2f}")
            if it == 1:
                report(f"graphs={graphs} B={B}")
torch.cuda.memory._record_memory_history(enabled=None)
