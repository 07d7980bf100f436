"""What holds GPU memory when the decode starts: live blocks grouped by the Python line that allocated them.

The release-sized pipeline of `bench_generate.py` (random weights, bf16, VAE slicing, `max_batch_size=8`) makes
B=1 and B=16 twice each, with CUDA graphs and then eagerly, the prompts encoded outside `__call__` as a user would.
At the first decode of each second call it takes a `torch.cuda.memory._snapshot()` (allocation stacks recorded) and
writes, to $OUT/memory_probe.txt, the memory per allocator pool and the 25 largest allocation sites; it also logs
what each stage's graph capture adds. Needs CUDA.

    OUT=out python3 benchmarks/probe_memory.py
"""

import collections
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_generate  # noqa: E402 (beside this file)

from diffusers_hart.pipelines.hart.stage_runner import CUDAGraphStageRunner  # noqa: E402

GIB = 2**30
# the frames that name an allocation site: this package's, the benchmark's and transformers' (the text encoder)
SITE_PATHS = ("diffusers_hart", "bench", "transformers/")


class Probe:
    """Writes every line both to stdout and to the report file; snapshots the allocator at the first decode."""

    def __init__(self, report_path: str):
        self.report = open(report_path, "w")
        self.snapshot, self.held = None, 0

    def say(self, *values) -> None:
        print(*values, file=self.report, flush=True)
        print(*values, flush=True)

    def log_captures(self) -> None:
        """Log what each stage's CUDA-graph capture leaves allocated."""
        capture = CUDAGraphStageRunner._capture

        def logged_capture(runner, stage_index, latent_tokens):
            before = torch.cuda.memory_allocated()
            captured = capture(runner, stage_index, latent_tokens)
            after = torch.cuda.memory_allocated()
            self.say(f"capture stage {stage_index}: +{(after - before) / GIB:.3f} GiB -> {after / GIB:.2f}")
            return captured

        CUDAGraphStageRunner._capture = logged_capture

    def snapshot_at_first_decode(self, vae) -> None:
        decode = vae.decode

        def probed_decode(*args, **kwargs):
            if self.snapshot is None:
                torch.cuda.synchronize()
                self.snapshot = torch.cuda.memory._snapshot()
                self.held = torch.cuda.memory_allocated()
            return decode(*args, **kwargs)

        vae.decode = probed_decode

    def write_report(self, tag: str) -> None:
        """Active memory per allocator pool, then the 25 allocation sites holding the most."""
        self.say(f"== {tag}: allocated at decode start {self.held / GIB:.2f} GiB")
        active, reserved = collections.Counter(), collections.Counter()
        by_site, blocks = collections.Counter(), collections.Counter()
        for segment in self.snapshot["segments"]:
            pool = str(segment.get("segment_pool_id"))
            reserved[pool] += segment["total_size"]
            for block in segment["blocks"]:
                if block["state"] != "active_allocated":
                    continue
                active[pool] += block["size"]
                frames = [f for f in block.get("frames", []) if any(p in f["filename"] for p in SITE_PATHS)]
                site = " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in frames[:4])
                by_site[site or "?"] += block["size"]
                blocks[site or "?"] += 1
        for pool in active:
            self.say(f"pool {pool}: active {active[pool] / GIB:.2f} GiB of {reserved[pool] / GIB:.2f} reserved")
        for site, size in by_site.most_common(25):
            self.say(f"{size / GIB:8.3f} GiB  x{blocks[site]:5d}  {site}")


def main():
    probe = Probe(os.path.join(os.environ["OUT"], "memory_probe.txt"))
    torch.manual_seed(0)
    pipe = bench_generate.release_sized_pipeline("adaln_single", torch.bfloat16, "cuda")
    pipe.vae.enable_slicing()
    probe.say("after build", torch.cuda.memory_allocated() / GIB)
    probe.log_captures()
    probe.snapshot_at_first_decode(pipe.vae)

    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    for graphs in (True, False):
        pipe.disable_cuda_graphs()
        gc.collect()
        torch.cuda.empty_cache()
        if graphs:
            pipe.enable_cuda_graphs()
        for batch_size in (1, 16):
            embeds = bench_generate.encoded_prompts(pipe, batch_size)
            torch.cuda.empty_cache()
            for call in range(2):
                probe.snapshot = None
                torch.cuda.reset_peak_memory_stats()
                pipe(
                    generator=torch.Generator().manual_seed(call), guidance_scale=4.5, more_smooth=True,
                    output_type="pt", max_batch_size=8, **embeds,
                )  # fmt: skip
                torch.cuda.synchronize()
                probe.say(
                    f"graphs={graphs} B={batch_size} call {call}: peak {torch.cuda.max_memory_allocated() / GIB:.2f} "
                    f"GiB, after {torch.cuda.memory_allocated() / GIB:.2f}"
                )
                if call == 1:  # the second call: graphs captured, nothing left of the first call's set-up
                    probe.write_report(f"graphs={graphs} B={batch_size}")
    torch.cuda.memory._record_memory_history(enabled=None)


if __name__ == "__main__":
    main()
