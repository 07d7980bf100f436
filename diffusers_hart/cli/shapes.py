"""`hart-make-shapes` and `hart-eval-shapes`: the coloured-shapes benchmark from the command line.

    hart-make-shapes --output shapes-train --num-images 10000
    hart-make-shapes --output shapes-eval --num-images 500 --split eval --seed 1
    hart-eval-shapes generated/ --output scores.json
    hart-sample-shapes --model shapes-model --output generated --num-prompts 200   # then judges them
    accelerate launch --num_processes 2 -m diffusers_hart.cli.shapes sample --model ... # split across 2 GPUs

`hart-eval-shapes` judges any imagefolder whose `metadata.jsonl` pairs images with shapes captions: a dataset made
here (its own ground truth scores 100%) or images a model generated from `evaluation_prompts`.
Errors the user can fix are one line on stderr with exit status 2; `--debug` shows their traceback.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from ..training.shapes import MAX_SIDE, MIN_SIDE, SPLITS, evaluate_folder, evaluation_prompts, write_dataset
from .parser import CommandParser, positive_int


def build_make_parser() -> CommandParser:
    parser = CommandParser(
        prog="hart-make-shapes",
        description="Write a coloured-shapes text-to-image dataset: PNGs + metadata.jsonl (Hugging Face imagefolder).",
    )
    parser.add_argument("--output", required=True, help="folder to write, new or empty unless --overwrite (required)")
    parser.add_argument("--num-images", type=positive_int, default=1000, help="images to write (default: %(default)s)")
    parser.add_argument(
        "--size", type=int, default=64, help=f"image side in pixels, {MIN_SIDE} to {MAX_SIDE} (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of scenes and rendering (default: %(default)s)")
    parser.add_argument(
        "--split", choices=SPLITS, default="train",
        help="'train' never shows a held-out colour-shape pair, 'eval' always shows one (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="write into a non-empty folder, first deleting the files its metadata.jsonl lists (default: off)",
    )  # fmt: skip
    parser.add_argument(
        "--partial-captions", type=float, default=0.0, metavar="PROBABILITY",
        help="leave out each object's colour or shape with this probability, a training augmentation: 'a triangle "
        "at the top left', 'a green shape at the top left' (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--auxiliary-colours", action="store_true",
        help="also draw colours no evaluation prompt asks for (orange, lime, cyan, pink), each with every shape; "
        "--split train only (default: off)",
    )  # fmt: skip
    return parser


def build_eval_parser() -> CommandParser:
    parser = CommandParser(
        prog="hart-eval-shapes",
        description="Judge the images of an imagefolder against their shapes captions; prints the accuracies as JSON.",
    )
    parser.add_argument("folder", help='folder with metadata.jsonl lines {"file_name": ..., "text": ...} (required)')
    parser.add_argument(
        "--output", default=None,
        help="also write the accuracies and every image's judgement to this JSON file (default: none)",
    )  # fmt: skip
    return parser


def build_sample_parser() -> CommandParser:
    from .generate import add_model_arguments

    parser = CommandParser(
        prog="hart-sample-shapes",
        description="Generate the shapes evaluation prompts with a model into an imagefolder, then judge them. Under "
        "`accelerate launch` the prompts are split across the processes.",
    )
    add_model_arguments(parser)
    parser.add_argument("--output", required=True, help="folder for the images and metadata.jsonl (required)")
    parser.add_argument(
        "--num-prompts", type=positive_int, default=200,
        help="evaluation prompts, at most 606 (1410 of --split train) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--split", choices=SPLITS, default="eval",
        help="'eval': every prompt holds a colour-shape pair held out of training; 'train': prompts of the training "
        "distribution (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-seed", type=int, default=0, help="seed choosing the evaluation prompts (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="image i is seeded seed + i (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="images per call (default: %(default)s)")
    return parser


def _make(args: argparse.Namespace) -> None:
    write_dataset(
        args.output, args.num_images, args.size, args.seed, args.split, args.overwrite, args.partial_captions,
        args.auxiliary_colours,
    )  # fmt: skip
    print(f"Wrote {args.num_images} {args.split} images of {args.size}x{args.size} pixels to {args.output}")


def _evaluate(args: argparse.Namespace) -> None:
    summary, per_image = evaluate_folder(args.folder)
    print(json.dumps(summary, indent=2))
    if args.output is not None:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({**summary, "per_image": per_image}, indent=2) + "\n")


def _sample(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from ..training.shapes_generation import generate_folder
    from .generate import pipeline_from_arguments

    import torch

    # under a launcher, processes on a machine without CUDA (or told --device cpu) split the prompts over gloo
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    prompts = evaluation_prompts(args.num_prompts, args.prompt_seed, args.split)
    pipe = pipeline_from_arguments(args, state.device if args.device == "auto" else None)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    generate_folder(
        pipe, prompts, args.output, batch_size=args.batch_size, seed=args.seed,
        guidance_scale=args.guidance_scale, more_smooth=not args.no_more_smooth, num_inference_steps=args.steps,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if state.is_main_process:
        summary, per_image = evaluate_folder(args.output)
        summary |= {
            "generation_seconds": seconds, "processes": state.num_processes, "model": args.model, "split": args.split,
        }  # fmt: skip
        print(json.dumps(summary, indent=2))
        (Path(args.output) / "scores.json").write_text(json.dumps({**summary, "per_image": per_image}, indent=2) + "\n")


def main_make(argv=None) -> int:
    """Entry point of `hart-make-shapes`: returns 0, or exits with status 2 and a one-line error."""
    return build_make_parser().run(_make, argv)


def main_eval(argv=None) -> int:
    """Entry point of `hart-eval-shapes`: returns 0, or exits with status 2 and a one-line error."""
    return build_eval_parser().run(_evaluate, argv)


def main_sample(argv=None) -> int:
    """Entry point of `hart-sample-shapes`: returns 0, or exits with status 2 and a one-line error."""
    return build_sample_parser().run(_sample, argv)


if __name__ == "__main__":  # `python -m diffusers_hart.cli.shapes {make,eval,sample} ...`, e.g. under accelerate launch
    commands = {"make": main_make, "eval": main_eval, "sample": main_sample}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m diffusers_hart.cli.shapes {{{','.join(commands)}}} ...")
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
