"""The VAE decode at the release's size: memory layout x group-norm implementation, timed and profiled on one GPU.

The decode is the largest phase left of a generation (`RESULTS.md`: 86 ms per 1024 px image in bf16, for about 3.2
TMAC). It times `HARTAutoEncoder.decode` of random latents (B, 32, 64, 64) in four variants: contiguous or
channels-last (`vae.use_channels_last`), each with the torch group norm (`DIFFUSERS_HART_DISABLE_TRITON=1`) or the
fused Triton one (`ops.group_norm_silu`), and reports the median, peak memory above the weights, the largest
difference from the contiguous torch decode, and the five kernels that took the most GPU time (torch.profiler).

    python benchmarks/bench_decode.py --batch-sizes 1,4 --output decode.json
"""

import argparse
import json
import os

import torch

from bench_generate import environment, release_vae, time_calls  # beside this file
from diffusers_hart.ops import DISABLE_TRITON_ENV

VARIANTS = {  # name: (channels-last, fused group norm)
    "contiguous, torch norm": (False, False),
    "contiguous, fused norm": (False, True),
    "channels-last, torch norm": (True, False),
    "channels-last, fused norm": (True, True),
}


def top_kernels(call, count: int = 5) -> list:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        call(0)
        torch.cuda.synchronize()
    events = sorted(profile.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:count]
    return [{"kernel": e.key[:120], "ms": e.device_time_total / 1e3, "calls": e.count} for e in events]


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    vae = release_vae().to("cuda", dtype).eval()
    weights = torch.cuda.memory_allocated()
    results = {"what": __doc__.splitlines()[0], "dtype": args.dtype, **environment(), "runs": []}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        latents = torch.randn(batch_size, 32, 64, 64, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
        baseline = None
        for name, (channels_last, fused) in VARIANTS.items():
            vae.use_channels_last = channels_last
            os.environ[DISABLE_TRITON_ENV] = "0" if fused else "1"
            images = vae.decode(latents).sample
            if baseline is None:
                baseline = images.float()
            run = time_calls(lambda seed: vae.decode(latents), batch_size, args.warmup, args.repeats)
            run["peak_memory_gib"] -= weights / 2**30
            run |= {
                "variant": name, "max_abs_diff_from_first": (images.float() - baseline).abs().max().item(),
                "top_kernels": top_kernels(lambda seed: vae.decode(latents)),
            }  # fmt: skip
            results["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "top_kernels"}), flush=True)
    print("| B | variant | median s | peak GiB above weights | max diff from the first |\n|---|---|---|---|---|")
    for run in results["runs"]:
        print(f"| {run['batch_size']} | {run['variant']} | {run['median_s']:.4f} | {run['peak_memory_gib']:.2f} | "
              f"{run['max_abs_diff_from_first']:.3g} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
