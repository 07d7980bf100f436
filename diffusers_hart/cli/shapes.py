"""`hart-make-shapes` and `hart-eval-shapes`: the coloured-shapes benchmark from the command line.

    hart-make-shapes --output shapes-train --num-images 10000
    hart-make-shapes --output shapes-eval --num-images 500 --split eval --seed 1
    hart-eval-shapes generated/ --output scores.json

`hart-eval-shapes` judges any imagefolder whose `metadata.jsonl` pairs images with shapes captions: a dataset made
here (its own ground truth scores 100%) or images a model generated from `evaluation_prompts`.
Errors the user can fix are one line on stderr with exit status 2; `--debug` shows their traceback.
"""

import argparse
import json
from pathlib import Path

from ..training.shapes import MAX_SIDE, MIN_SIDE, SPLITS, evaluate_folder, write_dataset
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


def _make(args: argparse.Namespace) -> None:
    write_dataset(args.output, args.num_images, args.size, args.seed, args.split, args.overwrite)
    print(f"Wrote {args.num_images} {args.split} images of {args.size}x{args.size} pixels to {args.output}")


def _evaluate(args: argparse.Namespace) -> None:
    summary, per_image = evaluate_folder(args.folder)
    print(json.dumps(summary, indent=2))
    if args.output is not None:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({**summary, "per_image": per_image}, indent=2) + "\n")


def main_make(argv=None) -> int:
    """Entry point of `hart-make-shapes`: returns 0, or exits with status 2 and a one-line error."""
    return build_make_parser().run(_make, argv)


def main_eval(argv=None) -> int:
    """Entry point of `hart-eval-shapes`: returns 0, or exits with status 2 and a one-line error."""
    return build_eval_parser().run(_evaluate, argv)
