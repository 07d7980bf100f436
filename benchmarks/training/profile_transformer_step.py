"""Where a shapes transformer training step spends its time on a GPU: the step alone, on one batch already on the device.

Times `HARTTextEncoderTrainingModule` forward + backward + AdamW (bf16 autocast, as `--mixed_precision bf16` runs it)
at several batch sizes, for two ways of drawing the last scale's token orders in the same run: `batched`, the
package's (`TrainingRandomness.permutations`: one draw of keys, one sort) and `randperm_per_row`, what it did before
(a `torch.randperm` per row). Steps are queued without reading the device in between, as the trainer now runs them;
a torch profiler table of the host's busiest ops for a few steps of each goes to the log.

    python benchmarks/training/profile_transformer_step.py --output profile.json
"""

import argparse
import json
import platform
import time

import torch
import transformers

import diffusers_hart
from diffusers_hart import HARTPipeline
from diffusers_hart.pipelines.hart.pipeline_hart import tokenize_for_text_encoder
from diffusers_hart.training import HARTTextEncoderTrainingModule, HARTTransformerTrainingModule, TrainingRandomness
from diffusers_hart.training.shapes import evaluation_prompts

PACKAGED = "diffusers_hart/pretrained/shapes"
BATCHED = TrainingRandomness.permutations


def randperm_per_row(self: TrainingRandomness, num_tokens: int) -> torch.LongTensor:
    """The baseline: the package's permutations before they were drawn in one batch."""
    rows = [torch.randperm(num_tokens, device=self.device) for _ in range(self.batch_size)]
    return torch.stack(rows)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, num_steps: int, device: torch.device) -> float:
    """Seconds per step of `num_steps` queued steps, after two untimed ones."""
    for _ in range(2):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(num_steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / num_steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=PACKAGED, help="a shapes HARTPipeline folder")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", required=True, help="JSON file for the timings")
    parser.add_argument("--device", default="cuda", help="cpu only checks the script")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    pipeline = HARTPipeline.from_pretrained(args.model)
    transformer, text_encoder = pipeline.transformer.float().train(), pipeline.text_encoder.float().train()
    step_module = HARTTransformerTrainingModule(transformer, pipeline.vae.float(), pipeline.scheduler)
    module = HARTTextEncoderTrainingModule(step_module, text_encoder).to(device)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    context_length = transformer.config.context_length

    def batch_of(size):
        prompts = evaluation_prompts(size, split="train")
        inputs = tokenize_for_text_encoder(pipeline.tokenizer, prompts, context_length, pipeline.config.system_prompt)
        pixels = torch.rand(size, 3, 64, 64).mul(2).sub(1)
        return [pixels.to(device), *(t.to(device) for t in inputs)]

    results = []
    for size in args.batch_sizes:
        batch = batch_of(size)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = module(*batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for orders, permutations in (("batched", BATCHED), ("randperm_per_row", randperm_per_row)):
            TrainingRandomness.permutations = permutations
            try:
                seconds = timed_steps(step, args.steps, device)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                    for _ in range(3):
                        step()
                    synchronize(device)
            finally:
                TrainingRandomness.permutations = BATCHED
            print(f"--- batch {size}, orders {orders}: {seconds * 1e3:.1f} ms/step, {size / seconds:.0f} images/s")
            print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
            results.append({"batch_size": size, "orders": orders, "ms_per_step": seconds * 1e3,
                            "images_per_second": size / seconds})  # fmt: skip

    report = {
        "what": "one shapes transformer + text encoder training step on a fixed device batch (bf16 autocast, AdamW), "
        "steps queued without host reads, two warm-up steps untimed",
        "model": args.model,
        "steps_timed": args.steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "diffusers_hart": diffusers_hart.__version__, "python": platform.python_version()},  # fmt: skip
        "results": results,
    }
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
