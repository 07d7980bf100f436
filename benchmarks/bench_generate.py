"""Latency, throughput, phase breakdown and peak memory of HARTPipeline at the release's size, random weights.

Weights do not change the work done (the same shapes, scales and diffusion steps), so random weights time the real
1024x1024 pipeline without the checkpoint. Shapes follow HART-0.7B-1024px: 14 scales up to a 64x64 latent, a
1536-wide transformer with 24 heads, 300 text tokens, a 4096-entry codebook of 32 channels, the 1024x6 diffusion MLP
with 8 steps, a Qwen2-1.5B-shaped text encoder. Two configs, as the issue tracker's baseline table:
`depth24-adaln_single` and `depth16-adaln` (per-block AdaLN). cfg 4.5, more_smooth on.

Each batch size gets warm-up calls, then the median of timed calls, CUDA-synchronised. The text encoder runs once per
call and is timed as its own phase; the end-to-end time excludes it (`prompt_embeds` are passed), as the baseline
table does; its weights leave the card while the rest is timed, so peak memory is comparable with the original's
harness, which holds no text encoder. Phases come from CUDA events around the transformer's stage calls, the residual
head and the decode.
`--generator cpu` seeds the way the README does (`torch.Generator().manual_seed(s)`), `cuda` with a CUDA generator.

With `--reference-dir DIR` (a checkout of mit-han-lab/hart; see `reference_hart.py`) the original is built at the
same config with random weights and timed in the same process, after this package, at the same batch sizes, warm-ups
and repeats (its own CUDA generator; float32 weights under float16 autocast, as its `latency_profile.py` runs), and
the table gains the ratios.

    python benchmarks/bench_generate.py --output results.json
    python benchmarks/bench_generate.py --reference-dir ../hart --output results.json
"""

import argparse
import gc
import json
import platform
import statistics
import time
from collections import defaultdict

import torch
import transformers
from transformers import Qwen2Config, Qwen2Model

import diffusers
import diffusers_hart.pipelines.hart.pipeline_hart as pipeline_module
from diffusers_hart import HARTAutoEncoder, HARTPipeline, HARTResidualDiffusionScheduler, HARTTransformer2DModel
from diffusers_hart.pipelines.hart.tiny import TINY_SYSTEM_PROMPT, byte_level_tokenizer

PATCH_NUMS = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
CONFIGS = {"depth24-adaln_single": (24, "adaln_single"), "depth16-adaln": (16, "adaln")}
PHASES = ("ar_stages", "diffusion_head", "decode")
PROMPT = "A small fluffy white cat sleeping on a sunny windowsill, surrounded by pots of red flowers"


def release_vae() -> HARTAutoEncoder:
    """The tokenizer of HART-0.7B-1024px, random weights."""
    return HARTAutoEncoder(ch=160, ch_mult=(1, 1, 2, 2, 4), z_channels=32, vocab_size=4096, patch_nums=PATCH_NUMS)


def release_sized_pipeline(block_conditioning: str, dtype: torch.dtype, device: str, num_layers: int = 24):
    tokenizer = byte_level_tokenizer()
    with torch.device(device):
        text_encoder = Qwen2Model(
            Qwen2Config(
                vocab_size=len(tokenizer), hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=2048,
                pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip
        vae = release_vae()
        transformer = HARTTransformer2DModel(
            patch_nums=PATCH_NUMS, num_layers=num_layers, hidden_size=1536, num_attention_heads=24,
            context_dim=1536, context_length=300, vocab_size=4096, latent_channels=32,
            block_conditioning=block_conditioning, diffusion_head_width=1024, diffusion_head_depth=6,
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


class PhaseTimer:
    """Sums CUDA-event times of wrapped calls by phase, without synchronising inside the pipeline, and notes which
    phase last raised the allocator's peak (allocations happen at launch, on the host, so no sync is needed).

    For memory, each phase also records (`memory`, GiB, the largest over its calls) what was allocated when it started
    and how far its own peak rose above that: what a phase finds held, against what it adds.
    """

    OUTSIDE = "between the timed phases"

    def __init__(self):
        self.events = defaultdict(list)
        self.forget_peak()

    def forget_peak(self) -> None:
        """Start over, after `torch.cuda.reset_peak_memory_stats()`."""
        self.peak_phase, self.last_peak = None, 0
        self.memory = {}

    def note_peak(self, name) -> None:
        peak = torch.cuda.max_memory_allocated()
        if peak > self.last_peak:
            self.peak_phase, self.last_peak = name, peak

    def peak_bytes(self) -> int:
        """The peak since `forget_peak`, across the per-phase resets of the allocator's peak."""
        return max(self.last_peak, torch.cuda.max_memory_allocated())

    def wrap(self, name, function):
        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.note_peak(self.OUTSIDE)
            torch.cuda.reset_peak_memory_stats()  # the phase's own peak from here; last_peak keeps the overall one
            held = torch.cuda.memory_allocated()
            start.record()
            out = function(*args, **kwargs)
            end.record()
            self.note_peak(name)
            memory = self.memory.setdefault(name, {"held_at_start": 0.0, "rise": 0.0})
            memory["held_at_start"] = max(memory["held_at_start"], held / 2**30)
            memory["rise"] = max(memory["rise"], (torch.cuda.max_memory_allocated() - held) / 2**30)
            self.events[name].append((start, end))
            return out

        return timed

    def seconds(self) -> dict:
        torch.cuda.synchronize()
        totals = {name: sum(s.elapsed_time(e) for s, e in pairs) / 1000 for name, pairs in self.events.items()}
        self.events.clear()
        return totals


class TimedStageRunner:
    """A pipeline stage runner (eager or graphed) whose stage calls are timed as "ar_stages"."""

    def __init__(self, runner, timer: PhaseTimer):
        self.runner, self.timed_call = runner, timer.wrap("ar_stages", runner)

    def set_condition(self, condition) -> None:
        self.runner.set_condition(condition)

    def __call__(self, latent_tokens, stage_index):
        return self.timed_call(latent_tokens, stage_index)


def instrument(pipe) -> PhaseTimer:
    timer = PhaseTimer()
    pipe.text_encoder.forward = timer.wrap("text_encoder", pipe.text_encoder.forward)
    # the stage runner, not the transformer: replayed CUDA graphs never call the transformer's forward
    stage_runner = pipe._stage_runner

    def timed_runner(rows, device):
        return TimedStageRunner(stage_runner(rows, device), timer)

    pipe._stage_runner = timed_runner
    pipe.vae.decode = timer.wrap("decode", pipe.vae.decode)
    pipeline_module.sample_residual_tokens = timer.wrap("diffusion_head", pipeline_module.sample_residual_tokens)
    return timer


def time_calls(call, batch_size, warmup, repeats, timer=None) -> dict:
    """Median wall time of `call(seed)` over `repeats` after `warmup` calls, CUDA-synchronised; peak memory and,
    with a `PhaseTimer`, the median of each phase."""
    torch.cuda.reset_peak_memory_stats()
    if timer:
        timer.forget_peak()
    times, phases = [], []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call(i)
        if timer:
            timer.note_peak(timer.OUTSIDE)
        torch.cuda.synchronize()
        seconds, phase = time.perf_counter() - start, timer.seconds() if timer else {}
        if i >= warmup:
            times.append(seconds)
            phases.append(phase)
    median = statistics.median(times)
    return {
        "batch_size": batch_size, "median_s": median, "min_s": min(times), "max_s": max(times),
        "images_per_s": batch_size / median, "repeats": repeats,
        "peak_memory_gib": (timer.peak_bytes() if timer else torch.cuda.max_memory_allocated()) / 2**30,
        "phases_s": {name: statistics.median(p.get(name, 0.0) for p in phases) for name in PHASES} if timer else {},
        "peak_reached_in": timer.peak_phase if timer else None,
        "memory_gib": timer.memory if timer else {},
    }  # fmt: skip


def encoded_prompts(pipe, batch_size: int) -> dict:
    """`PROMPT` x `batch_size` encoded on the GPU, as `__call__` keyword arguments; the text encoder then leaves the
    card: it is timed on its own and the original's harness holds none, so its weights stay out of the peak."""
    pipe.text_encoder.to("cuda")
    embeds = pipe.encode_prompt([PROMPT] * batch_size, device="cuda")
    pipe.text_encoder.to("cpu")
    names = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
    return dict(zip(names, embeds))


def time_batch(pipe, timer, batch_size, generator_device, warmup, repeats, max_batch_size=None):
    embeds = encoded_prompts(pipe, batch_size)
    text_seconds = timer.seconds()["text_encoder"]
    kwargs = dict(embeds, guidance_scale=4.5, more_smooth=True, output_type="pt", max_batch_size=max_batch_size)

    def call(seed):
        pipe(generator=torch.Generator(generator_device).manual_seed(seed), **kwargs)

    run = time_calls(call, batch_size, warmup, repeats, timer)
    run["phases_s"]["text_encoder (not in median_s)"] = text_seconds
    return {"generator": generator_device, **run}


def time_reference(reference, batch_size, warmup, repeats):
    context = reference.context(batch_size)
    return {"generator": "original's own (CUDA)", **time_calls(lambda seed: reference(context, seed), batch_size, warmup, repeats)}


def _table(header, rows) -> list:
    """Markdown lines of a table: `header` cells, then one line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results) -> str:
    runs = results["runs"]
    header = ("system: config", "B", "generator", "median s", "img/s", "peak GiB", "peak in", "AR stages s", "head s",
              "decode s", "text enc. s")  # fmt: skip
    rows = []
    for run in runs:
        phases = [run["phases_s"].get(name) for name in (*PHASES, "text_encoder (not in median_s)")]
        rows.append([
            f"{run['system']}: {run['config']}", str(run["batch_size"]), run["generator"], f"{run['median_s']:.3f}",
            f"{run['images_per_s']:.2f}", f"{run['peak_memory_gib']:.1f}", run.get("peak_reached_in") or "-",
            *("-" if p is None else f"{p:.3f}" for p in phases),
        ])  # fmt: skip
    lines = _table(header, rows)
    memory_rows = [
        [f"{run['system']}: {run['config']}", str(run["batch_size"]), phase, f"{m['held_at_start']:.2f}",
         f"{m['rise']:.2f}"]
        for run in runs for phase, m in run.get("memory_gib", {}).items()
    ]  # fmt: skip
    if memory_rows:
        header = ("system: config", "B", "phase", "GiB allocated at its start", "GiB its peak rose above that")
        lines += ["", *_table(header, memory_rows)]
    ratios = speedups(runs)
    if ratios:
        header = ("config", "B", "generator", "original s", "this package s", "speed-up", "peak GiB original / this")
        lines += ["", *_table(header, (
            [r["config"], str(r["batch_size"]), r["generator"], f"{r['original_s']:.3f}", f"{r['this_s']:.3f}",
             f"{r['speedup']:.2f}x", f"{r['original_peak_gib']:.1f} / {r['this_peak_gib']:.1f}"]
            for r in ratios
        ))]  # fmt: skip
    return "\n".join(lines)


def speedups(runs) -> list:
    """The original's median over this package's, for every run of both at the same config and batch size."""
    originals = {(r["config"], r["batch_size"]): r for r in runs if r["system"] == "original"}
    ratios = []
    for run in runs:
        original = originals.get((run["config"], run["batch_size"]))
        if run["system"] != "original" and original:
            ratios.append({
                "config": run["config"], "batch_size": run["batch_size"], "generator": run["generator"],
                "original_s": original["median_s"], "this_s": run["median_s"],
                "speedup": original["median_s"] / run["median_s"],
                "original_peak_gib": original["peak_memory_gib"], "this_peak_gib": run["peak_memory_gib"],
            })  # fmt: skip
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS))
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--generators", default="cpu,cuda", help="devices of the seeding generator")
    parser.add_argument("--repeats", default="1:7,16:5", help="timed calls per batch size (B:n, default 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cuda-graphs", action="store_true", help="pipe.enable_cuda_graphs() (replayed stages)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="pipe(max_batch_size=...): micro-batches")
    parser.add_argument("--vae-slicing", action="store_true", help="pipe.vae.enable_slicing(): one image per decode")
    parser.add_argument("--label", default="diffusers_hart", help="name of the system measured, in the output")
    parser.add_argument("--reference-dir", default=None, help="a checkout of mit-han-lab/hart to time in the same run")
    parser.add_argument("--output", default=None, help="JSON file for the results (a .md table is written beside it)")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    repeats = defaultdict(lambda: 5, {int(b): int(n) for b, n in (item.split(":") for item in args.repeats.split(","))})

    results = {
        "what": __doc__.splitlines()[0], "label": args.label, "dtype": args.dtype, "cuda_graphs": args.cuda_graphs,
        "max_batch_size": args.max_batch_size, "vae_slicing": args.vae_slicing,
        **environment(), "runs": [],
    }  # fmt: skip
    unwrapped_head = pipeline_module.sample_residual_tokens
    for config in args.configs.split(","):
        pipeline_module.sample_residual_tokens = unwrapped_head
        num_layers, block_conditioning = CONFIGS[config]
        torch.manual_seed(0)
        pipe = release_sized_pipeline(block_conditioning, dtype, "cuda", num_layers=num_layers)
        timer = instrument(pipe)
        if args.cuda_graphs:
            pipe.enable_cuda_graphs()
        if args.vae_slicing:
            pipe.vae.enable_slicing()
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            for generator_device in args.generators.split(","):
                run = time_batch(
                    pipe, timer, batch_size, generator_device, args.warmup, repeats[batch_size], args.max_batch_size
                )
                results["runs"].append({"system": args.label, "config": config, **run})
                print(json.dumps(results["runs"][-1]), flush=True)
        configs = (pipe.transformer.config, pipe.vae.config)
        pipe.disable_cuda_graphs()  # frees the graph pools, which the original's peak memory below must not count
        del pipe, timer
        gc.collect()  # the instrumented pipeline is a reference cycle (its stage runner wraps its own method)
        torch.cuda.empty_cache()
        if args.reference_dir:
            from reference_hart import ReferenceGenerator  # noqa: E402 (beside this file; only with --reference-dir)

            torch.manual_seed(0)
            reference = ReferenceGenerator(args.reference_dir, *configs)
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                run = time_reference(reference, batch_size, args.warmup, repeats[batch_size])
                results["runs"].append({"system": "original", "config": config, **run})
                print(json.dumps(results["runs"][-1]), flush=True)
            del reference
            torch.cuda.empty_cache()
    results["speedups"] = speedups(results["runs"])
    table = markdown(results)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
        with open(args.output.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
