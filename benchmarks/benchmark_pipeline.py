"""End-to-end latency and throughput of HARTPipeline at the release's size, with random weights.

Weights do not change the work done (the same shapes, the same number of scales and diffusion
steps), so random weights time the real 1024x1024 pipeline without the checkpoint. The shapes
follow HART-0.7B-1024px: 14 scales up to a 64x64 latent (1024 px), 1536-wide transformer with
24 layers and 24 heads, 300 text tokens, a 4096-entry codebook of 32 channels, the 1024x6
diffusion MLP with 8 steps, and a Qwen2-1.5B-shaped text encoder. The release's exact
conditioning variant is not published; `--block-conditioning` picks one.

    python benchmarks/benchmark_pipeline.py --output results.json
"""

import argparse
import json
import platform
import time

import torch
import transformers
from transformers import Qwen2Config, Qwen2Model

import diffusers
from diffusers_hart import HARTAutoEncoder, HARTPipeline, HARTResidualDiffusionScheduler, HARTTransformer2DModel
from diffusers_hart.pipelines.hart.tiny import TINY_SYSTEM_PROMPT, byte_level_tokenizer

PATCH_NUMS = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def release_sized_pipeline(block_conditioning: str, dtype: torch.dtype, device: str) -> HARTPipeline:
    tokenizer = byte_level_tokenizer()
    with torch.device(device):
        text_encoder = Qwen2Model(
            Qwen2Config(
                vocab_size=len(tokenizer), hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=2048,
                pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip
        vae = HARTAutoEncoder(ch=160, ch_mult=(1, 1, 2, 2, 4), z_channels=32, vocab_size=4096, patch_nums=PATCH_NUMS)
        transformer = HARTTransformer2DModel(
            patch_nums=PATCH_NUMS, num_layers=24, hidden_size=1536, num_attention_heads=24, context_dim=1536,
            context_length=300, vocab_size=4096, latent_channels=32, block_conditioning=block_conditioning,
            diffusion_head_width=1024, diffusion_head_depth=6,
        )  # fmt: skip
    pipe = HARTPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), transformer=transformer.eval(), vae=vae.eval(),
        scheduler=HARTResidualDiffusionScheduler(), system_prompt=TINY_SYSTEM_PROMPT * 8,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def environment() -> dict:
    """The card and the software versions a result was measured with."""
    return {
        "device": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
        },
    }  # fmt: skip


def time_call(pipe, batch_size: int, repeats: int, warmup: int = 2) -> list:
    prompts = ["A small fluffy white cat sleeping on a sunny windowsill, surrounded by pots of red flowers"] * batch_size
    times = []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(prompts, generator=torch.Generator("cuda").manual_seed(i), output_type="pt")
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-conditioning", default="adaln", choices=["adaln", "adaln_single", "prenorm"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    pipe = release_sized_pipeline(args.block_conditioning, dtype, "cuda")
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("text_encoder", "transformer", "vae")}
    results = {
        "what": "HARTPipeline end to end (text encoding, 14 scales, 8-step residual head, decoding), random weights",
        **environment(),
        "dtype": args.dtype,
        "block_conditioning": args.block_conditioning,
        "parameters": counts,
        "runs": [],
    }  # fmt: skip
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        times = sorted(time_call(pipe, batch_size, args.repeats))
        median = times[len(times) // 2]
        results["runs"].append(
            {"batch_size": batch_size, "median_s": median, "min_s": times[0], "max_s": times[-1],
             "images_per_s": batch_size / median, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
        )  # fmt: skip
        print(f"batch {batch_size}: {median:.3f} s median ({batch_size / median:.2f} img/s)", flush=True)
    print(json.dumps(results, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
