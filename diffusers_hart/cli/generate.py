"""`hart-generate`: one command from a prompt to a PNG."""

import argparse
import logging
import sys
from pathlib import Path

import torch
from PIL import Image

TINY_RANDOM = "tiny-random"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

logger = logging.getLogger("hart-generate")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_pipeline(model: str, dtype: torch.dtype):
    from ..pipelines import HARTPipeline

    if model == TINY_RANDOM:
        from ..pipelines.hart.tiny import tiny_random_pipeline

        logger.warning("Using the tiny random-weight model: its images are noise. Pass --model for a converted HART.")
        pipe = tiny_random_pipeline()
        return pipe if dtype == torch.float32 else pipe.to(dtype)
    return HARTPipeline.from_pretrained(model, dtype=dtype)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hart-generate", description="Generate images with HART.")
    parser.add_argument("prompt", help="text prompt")
    parser.add_argument(
        "--model", default=TINY_RANDOM,
        help=f"converted diffusers folder or Hub repo id; '{TINY_RANDOM}' (default) builds a tiny untrained model",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--num-images", type=int, default=1, help="images of the prompt, saved as one grid")
    parser.add_argument("--steps", type=int, default=None, help="residual-diffusion steps (default: the model's)")
    parser.add_argument("--no-more-smooth", action="store_true", help="hard token sampling (the FID setting)")
    parser.add_argument("--output", default="hart.png", help="PNG path")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.num_images < 1:
        print("hart-generate: --num-images must be at least 1", file=sys.stderr)
        return 2
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, dtype).to(device)
    images = pipe(
        args.prompt,
        guidance_scale=args.guidance_scale,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
        more_smooth=not args.no_more_smooth,
        num_inference_steps=args.steps,
    ).images
    if len(images) > 1:
        from diffusers.utils import make_image_grid

        cols = min(len(images), 4)
        rows = -(-len(images) // cols)
        images += [Image.new(images[0].mode, images[0].size)] * (rows * cols - len(images))  # black filler
        image = make_image_grid(images, rows=rows, cols=cols)
    else:
        image = images[0]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    logger.info(f"Saved {output} ({image.width}x{image.height}, device {device}, dtype {dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
