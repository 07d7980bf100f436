"""The flags `hart-train-tokenizer` and `hart-train-transformer` share, and `--config FILE`.

A config file (JSON, or YAML when PyYAML is installed) maps flag names, with or without the leading `--`, to values:
`{"learning_rate": 1e-4, "use_ema": true, "validation_prompts": ["a cat", "a dog"]}`. Its entries are turned into
command-line tokens placed before the real ones, so argparse checks them like typed flags (types, choices, one-line
errors) and a flag on the command line overrides the file.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from diffusers.optimization import SchedulerType

from .parser import CommandParser, positive_int


def non_negative_int(text: str) -> int:
    """argparse type of step counts that may be 0: `int(text)`, refused below 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, got {text!r}")
    return value


class TrainingCommandParser(CommandParser):
    """A `CommandParser` whose `parse_args` reads `--config FILE` first (see the module docstring)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_argument(
            "--config", default=None, metavar="FILE",
            help="JSON or YAML file of flag values, keys named like the flags; command-line flags override it "
            "(default: none)",
        )  # fmt: skip

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(argv)
        if known.config is not None:
            argv = self._config_tokens(known.config) + argv
        return super().parse_args(argv, namespace)

    def _config_tokens(self, path: str) -> List[str]:
        entries = _read_config(path, self)
        tokens = []
        for key, value in entries.items():
            flag = "--" + key.lstrip("-")
            action = self._option_string_actions.get(flag)
            if action is None or action.dest in ("config", "help"):
                self.error(f"config {path}: unknown flag {key!r} (see --help for the flags)")
            tokens += _tokens(flag, action, value, path, self)
        return tokens


def _read_config(path: str, parser: CommandParser) -> Dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        parser.error(f"--config {path}: no such file")
    text = file.read_text()
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            parser.error("YAML configs need PyYAML: pip install pyyaml (or write the config as JSON)")
        load, syntax_errors = yaml.safe_load, (yaml.YAMLError,)
    else:
        load, syntax_errors = json.loads, (ValueError,)
    try:
        entries = load(text)
    except syntax_errors as error:
        parser.error(f"config {path}: {error}")
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        parser.error(f"config {path}: expected a mapping of flag names to values, got {type(entries).__name__}")
    return entries


def _tokens(flag: str, action: argparse.Action, value: Any, path: str, parser: CommandParser) -> List[str]:
    """The command-line tokens that give `flag` the config's `value`."""
    if value is None:  # "use the default"
        return []
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            parser.error(f"config {path}: {flag[2:]} is a switch, expected true or false, got {value!r}")
        return [flag] if value else []
    if isinstance(value, list):
        if action.nargs not in ("+", "*"):
            parser.error(f"config {path}: {flag[2:]} takes one value, got a list")
        return [flag, *map(str, value)]
    if isinstance(value, dict):
        parser.error(f"config {path}: {flag[2:]} takes a value, got a mapping")
    return [flag, str(value)]


def build_training_parser(prog: str, description: str, output_dir: str, resolution_help: str, resolution_default):
    """The parser with every flag both trainers share; each adds its own model flags."""
    parser = TrainingCommandParser(prog=prog, description=description)
    # fmt: off
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", default=None,
                      help='imagefolder: images + metadata.jsonl lines {"file_name": ..., "text": ...} (default: none)')
    data.add_argument("--dataset_name", default=None,
                      help="a `datasets` dataset (Hub id or local path) instead of --train_data_dir (default: none)")
    data.add_argument("--dataset_config_name", default=None, help="its config name (default: none)")
    data.add_argument("--cache_dir", default=None, help="where `datasets` caches downloads (default: its own)")
    data.add_argument("--image_column", default="image", help="dataset column of images (default: %(default)s)")
    data.add_argument("--caption_column", default="text", help="dataset column of captions (default: %(default)s)")
    data.add_argument("--resolution", type=positive_int, default=resolution_default, help=resolution_help)
    data.add_argument("--on_bad_image", choices=("skip", "error"), default="error",
                      help="an unreadable image stops the run, or is skipped with a warning (default: %(default)s)")
    data.add_argument("--random_crop", action="store_true",
                      help="crop at a random offset instead of the centre (default: off)")
    data.add_argument("--random_flip", action="store_true", help="mirror images at random (default: off)")
    data.add_argument("--dataloader_num_workers", type=non_negative_int, default=0,
                      help="data loading processes; 0 loads in the main process (default: %(default)s)")

    run = parser.add_argument_group("training")
    run.add_argument("--output_dir", default=output_dir,
                     help="checkpoints, logs, validation images and the final model (default: %(default)s)")
    run.add_argument("--logging_dir", default="logs",
                     help="log folder, relative to --output_dir: losses.jsonl, validation.jsonl, trackers' files "
                     "(default: %(default)s)")
    run.add_argument("--report_to", choices=("tensorboard", "wandb", "none"), default="tensorboard",
                     help="tracker beside losses.jsonl; tensorboard is skipped when not installed "
                     "(default: %(default)s)")
    run.add_argument("--tracker_project_name", default=prog, help="tracker project name (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of weights, data order and every random draw (default: %(default)s)")
    run.add_argument("--train_batch_size", type=positive_int, default=16,
                     help="images per process per forward (default: %(default)s)")
    run.add_argument("--num_train_epochs", type=positive_int, default=100,
                     help="epochs, unless --max_train_steps is set (default: %(default)s)")
    run.add_argument("--max_train_steps", type=positive_int, default=None,
                     help="optimizer steps; overrides --num_train_epochs (default: none)")
    run.add_argument("--max_train_seconds", type=positive_int, default=None,
                     help="also stop once training has run this long (checked after every optimizer step; the "
                     "learning-rate schedule still spans --max_train_steps), then checkpoint and save as at the end; "
                     "such a run is not reproducible step for step (default: none)")
    run.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                     help="forwards per optimizer step (default: %(default)s)")
    run.add_argument("--gradient_checkpointing", action="store_true",
                     help="recompute activations in the backward pass to save memory (default: off)")
    run.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                     help="autocast dtype; trained weights stay float32 (default: `accelerate config`'s, else no)")
    run.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    run.add_argument("--lr_scheduler", choices=[s.value for s in SchedulerType], default="constant",
                     help="learning-rate schedule (default: %(default)s)")
    run.add_argument("--lr_warmup_steps", type=non_negative_int, default=500,
                     help="warmup steps of the schedule (default: %(default)s)")
    run.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 (default: %(default)s)")
    run.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2 (default: %(default)s)")
    run.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay (default: %(default)s)")
    run.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon (default: %(default)s)")
    run.add_argument("--max_grad_norm", type=non_negative_float, default=1.0,
                     help="gradient clipping norm; 0 disables clipping (default: %(default)s)")
    run.add_argument("--use_ema", action="store_true",
                     help="keep an exponential moving average of the weights, validated and saved at the end "
                     "(default: off)")
    run.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (default: %(default)s)")

    state = parser.add_argument_group("checkpoints and validation")
    state.add_argument("--checkpointing_steps", type=positive_int, default=500,
                       help="save the training state every this many steps as output_dir/checkpoint-STEP "
                       "(default: %(default)s)")
    state.add_argument("--checkpoints_total_limit", type=positive_int, default=None,
                       help="keep at most this many checkpoints, deleting the oldest (default: keep all)")
    state.add_argument("--resume_from_checkpoint", default=None,
                       help='a checkpoint folder, or "latest" for the newest complete one under --output_dir '
                       "(a fresh start when there is none) (default: none)")
    state.add_argument("--validation_steps", type=positive_int, default=500,
                       help="validate every this many steps and at the end (default: %(default)s)")
    # fmt: on
    return parser
