"""`hart-generate`: one command from a prompt to a PNG.

Errors the user can fix (bad arguments, a missing model folder, a Hub id not in the offline cache, a corrupt
checkpoint, an input the pipeline refuses, `--device cuda` without CUDA) are one line on stderr with exit status 2;
`--debug` shows their traceback.
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from safetensors import SafetensorError

from ..pretrained import PACKAGED_MODELS, SHAPES, packaged_model_path
from ..utils import DTYPES
from .parser import CommandParser, positive_int

TINY_RANDOM = "tiny-random"

logger = logging.getLogger("hart-generate")


def _device_name(text: str) -> str:
    """argparse type of `--device`: 'auto' or a name `torch.device` accepts."""
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError as error:
            raise argparse.ArgumentTypeError(str(error)) from error
    return text


def _resolve_device(name: str) -> torch.device:
    """The device to run on; refuses a CUDA device this machine lacks before any model is loaded."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_pipeline(model: str, dtype: torch.dtype):
    """The tiny random-weight pipeline for `TINY_RANDOM`, a packaged model by its name (`SHAPES`), else
    `HARTPipeline.from_pretrained(model)`.

    A local path that does not exist raises `FileNotFoundError("no such folder: PATH")`, a Hub id missing from the
    offline cache an `OSError`; the caller reports both as one-line errors.
    """
    from ..pipelines import HARTPipeline

    if model == TINY_RANDOM:
        from ..pipelines.hart.tiny import tiny_random_pipeline

        logger.warning("Using the tiny random-weight model: its images are noise. Pass --model for a converted HART.")
        pipe = tiny_random_pipeline()
        return pipe if dtype == torch.float32 else pipe.to(dtype)
    if model in PACKAGED_MODELS:
        model = packaged_model_path(model)
    return HARTPipeline.from_pretrained(model, dtype=dtype)


def add_model_arguments(parser: CommandParser) -> None:
    """The options that choose and run a model, shared by the commands that generate."""
    parser.add_argument(
        "--model", default=SHAPES,
        help=f"converted diffusers folder or Hub repo id; '{SHAPES}' is the small model shipped with the package, "
        "trained on the shapes benchmark (64 px, prompts like 'a red circle at the top left and a blue square at "
        f"the bottom right'); '{TINY_RANDOM}' builds a tiny untrained model; a local folder named like one of "
        "these needs a path such as ./shapes (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--guidance-scale", type=float, default=4.5, help="classifier-free guidance scale (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None,
        help="residual-diffusion steps (default: the model's own count, 8 for HART)",
    )  # fmt: skip
    parser.add_argument(
        "--no-more-smooth", action="store_true",
        help="feed hard codes instead of gumbel-softmax mixtures, as for the original's FID numbers (default: off)",
    )  # fmt: skip
    parser.add_argument(
        "--device", type=_device_name, default="auto",
        help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1', ... (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES],
        help="'auto' is bf16 (or fp16) on CUDA and fp32 on CPU (default: %(default)s)",
    )  # fmt: skip


def pipeline_from_arguments(args: argparse.Namespace, device: Optional[torch.device] = None):
    """The pipeline `add_model_arguments`' options ask for, on its device (`device`, when given, wins over
    `--device`: a launcher's process device)."""
    device = device or _resolve_device(args.device)  # before loading: a wrong device should not cost a model load
    dtype = _resolve_dtype(args.dtype, device)
    return load_pipeline(args.model, dtype).to(device)


def build_parser() -> CommandParser:
    parser = CommandParser(prog="hart-generate", description="Generate images with HART.")
    parser.add_argument("prompt", help="text prompt")
    add_model_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default: %(default)s)")
    parser.add_argument(
        "--num-images", type=positive_int, default=1,
        help="images of the prompt, saved as one grid (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--output", default="hart.png", help="PNG path (default: %(default)s)")
    return parser


def generate(args: argparse.Namespace) -> None:
    """Run `hart-generate` with parsed arguments and save the PNG."""
    pipe = pipeline_from_arguments(args)
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
    logger.info(f"Saved {output} ({image.width}x{image.height}, device {pipe.device}, dtype {pipe.transformer.dtype})")


def main(argv=None) -> int:
    """Entry point of `hart-generate`: returns 0, or exits with status 2 and a one-line error."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # transformers lets a corrupt text-encoder file's SafetensorError through; diffusers raises OSError for its own
    return build_parser().run(generate, argv, expected=(OSError, ValueError, SafetensorError))


if __name__ == "__main__":
    sys.exit(main())
