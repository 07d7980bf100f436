"""bf16 and fp16 against fp32 at the release's size (random weights), with the sampled tokens teacher-forced.

The float32 run samples hard tokens (`more_smooth=False`); the half-precision runs are fed the same indices at every
stage, so they differ from it only by rounding. Per stage it reports the largest |post-CFG logit difference| and
that error in units of `u * S * (1 + 2t)` (u the dtype's unit roundoff, S the stage's largest float32 |raw logit|,
t its guidance weight), the quantity `tests/test_precision.py` bounds on the golden cases; then the image difference.

    python benchmarks/precision_release_size.py --output precision.json
"""

import argparse
import copy
import json

import torch
from bench_generate import environment, release_sized_pipeline

import diffusers_hart.pipelines.hart.pipeline_hart as pipeline_module
from diffusers_hart.pipelines.hart.sampling import RandomStreams, guidance_ratios

UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}
PROMPTS = ["A small fluffy white cat sleeping on a sunny windowsill", "A red bus in the rain"]
GUIDANCE = 4.5


def run(pipe, forced_indices=None):
    """(post-CFG logits per stage, raw logits per stage, sampled indices per stage, image)."""
    post_cfg, raw, indices = [], [], []
    original_filter, original_draw = pipeline_module.top_k_top_p_filter, RandomStreams.multinomial

    def recording_filter(logits, top_k, top_p):
        post_cfg.append(logits.float())
        return original_filter(logits, top_k, top_p)

    def draw(self, probs):
        idx = original_draw(self, probs) if forced_indices is None else forced_indices[len(indices)]
        indices.append(idx)
        return idx

    handle = pipe.transformer.register_forward_hook(lambda module, args, out: raw.append(out.logits.float()))
    pipeline_module.top_k_top_p_filter, RandomStreams.multinomial = recording_filter, draw
    try:
        image = pipe(
            PROMPTS, guidance_scale=GUIDANCE, more_smooth=False, generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images.float()  # fmt: skip
    finally:
        pipeline_module.top_k_top_p_filter, RandomStreams.multinomial = original_filter, original_draw
        handle.remove()
    return post_cfg, raw, indices, image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-conditioning", default="adaln", choices=["adaln", "adaln_single", "prenorm"])
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true float32 reference

    torch.manual_seed(0)
    reference = release_sized_pipeline(args.block_conditioning, torch.float32, "cuda")
    ref_logits, ref_raw, ref_indices, ref_image = run(reference)
    ratios = guidance_ratios(len(ref_logits))
    results = {
        "what": "half precision vs float32, teacher-forced tokens, release-sized random weights, 2 prompts, cfg 4.5",
        **environment(),
        "block_conditioning": args.block_conditioning,
        "dtypes": {},
    }
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        pipe = copy.deepcopy(reference).to(dtype)
        logits, _, _, image = run(pipe, forced_indices=ref_indices)
        stages = []
        for si, (low, high, raw) in enumerate(zip(logits, ref_logits, ref_raw)):
            error = (low - high).abs().max().item()
            unit = UNIT_ROUNDOFF[name] * raw.abs().max().item() * (1 + 2 * GUIDANCE * ratios[si])
            stages.append({"stage": si, "max_logit_error": error, "in_rounding_units": error / unit})
        results["dtypes"][name] = {"stages": stages, "max_image_error": (image - ref_image).abs().max().item()}
        print(name, json.dumps(results["dtypes"][name]), flush=True)
        del pipe
        torch.cuda.empty_cache()
    print(json.dumps(results, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
