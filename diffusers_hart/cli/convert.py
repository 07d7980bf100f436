r"""`hart-convert`: a released HART checkpoint -> a diffusers folder that `HARTPipeline.from_pretrained` loads.

    hart-convert --checkpoint_path hart-0.7b-1024px \
        --text_encoder_path Qwen2-VL-1.5B-Instruct \
        --output_path hart-0.7b-1024px-diffusers

`--checkpoint_path` holds the release's `llm/` and `tokenizer/`; `--text_encoder_path` is the Qwen2 text encoder
(model + tokenizer: a folder, or a Hub repo id). Without saving a folder, in Python:
`diffusers_hart.conversion.from_original(checkpoint_path, text_encoder_path)`.
"""

import argparse
import sys

from ..conversion import convert
from ..conversion.state_dict_utils import CheckpointKeyError
from ..utils import DTYPES
from .parser import CommandParser


def build_parser() -> CommandParser:
    parser = CommandParser(prog="hart-convert", description=__doc__)
    parser.add_argument(
        "--checkpoint_path", required=True, help="released folder holding llm/ and tokenizer/ (required)"
    )
    parser.add_argument(
        "--text_encoder_path", required=True, help="Qwen2 model + tokenizer: a folder or a Hub repo id (required)"
    )
    parser.add_argument("--output_path", required=True, help="new folder for the diffusers pipeline (required)")
    parser.add_argument(
        "--use_ema", action="store_true", default=True,
        help="the EMA weights, which the original samples with (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--no_use_ema", dest="use_ema", action="store_false", help="the plain (non-EMA) weights (default: off)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights (default: %(default)s)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="allow writing into a non-empty output folder (default: off)"
    )
    parser.add_argument(
        "--push_to_hub", action="store_true", help="upload the converted folder to --repo_id (default: off)"
    )
    parser.add_argument(
        "--repo_id", default=None, help="Hub repo to create and upload to with --push_to_hub (default: none)"
    )
    return parser


def _convert_command(args: argparse.Namespace) -> None:
    convert(
        args.checkpoint_path, args.text_encoder_path, args.output_path, args.use_ema, args.dtype,
        args.overwrite, args.push_to_hub, args.repo_id,
    )  # fmt: skip
    print(f"Saved the diffusers pipeline to {args.output_path}")


def main(argv=None) -> int:
    """Entry point of `hart-convert`: returns 0, or exits with status 2 and a one-line error."""
    return build_parser().run(_convert_command, argv, expected=(OSError, ValueError, CheckpointKeyError))


if __name__ == "__main__":
    sys.exit(main())
