"""The accelerate training loop that `hart-train-tokenizer` and `hart-train-transformer` share.

It follows diffusers' `examples/text_to_image/train_text_to_image.py` (Accelerator with mixed precision and gradient
accumulation, AdamW + `get_scheduler`, optional `EMAModel`, `save_state`/`load_state` checkpoints, a total limit on
them, `--resume_from_checkpoint latest`, validation every N steps), cut into functions both trainers call. A trainer
supplies what differs as `Objective`s (a loss module, its optimizer, how a batch becomes its loss) plus a
validation and a final-save callback; this module owns everything else.

Resuming reproduces an uninterrupted run step for step: the data order is a permutation seeded by `(seed, epoch)`
(not drawn from the global RNG, whose state would differ), `accelerator.load_state` restores the RNG streams the
losses draw from, the resumed epoch skips the batches already consumed (`skip_first_batches`), and validation runs
on a forked RNG so that it draws nothing from the training stream. Exact with `dataloader_num_workers=0` or without
random augmentation: workers draw their crops and flips from per-worker seeds that skipping batches shifts.
"""

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    ProjectConfiguration,
    is_tensorboard_available,
    is_wandb_available,
    set_seed,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpointing import complete_checkpoints, read_checkpoint_step, resolve_resume_checkpoint, save_checkpoint
from .data import METADATA_FILE, ImageTextDataset, ImageTextFolder, collate_image_text

logger = logging.getLogger(__name__)

LOSSES_FILE = "losses.jsonl"
VALIDATION_FILE = "validation.jsonl"
SUMMARY_FILE = "run_summary.json"
ARGS_FILE = "training_args.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------------------------------------------- data


def image_folder_dataset(
    folder, resolution: int, on_bad_image: str, center_crop: bool = True, random_flip: bool = False,
    captions_required: bool = True,
) -> Dataset:  # fmt: skip
    """An imagefolder with `metadata.jsonl` (image + caption); without one, when captions are not required (the
    tokenizer), every image file directly in `folder`, sorted by name, with empty captions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    transform = dict(on_bad_image=on_bad_image, center_crop=center_crop, random_flip=random_flip)
    if captions_required or (folder / METADATA_FILE).is_file():
        return ImageTextFolder(folder, resolution, **transform)
    rows = [{"image": str(p), "text": ""} for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise ValueError(f"{folder} holds no {METADATA_FILE} and no image ({', '.join(IMAGE_SUFFIXES)})")
    return ImageTextDataset(rows, resolution, **transform)


def build_train_dataset(args, captions_required: bool = True) -> Dataset:
    """The training set of `--train_data_dir` (an imagefolder) or `--dataset_name` (a `datasets` dataset's train
    split, read through `--image_column` / `--caption_column`)."""
    transform = dict(on_bad_image=args.on_bad_image, center_crop=not args.random_crop, random_flip=args.random_flip)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise ValueError("pass exactly one of --train_data_dir (an imagefolder) and --dataset_name")
    if args.train_data_dir is not None:
        return image_folder_dataset(
            args.train_data_dir, args.resolution, captions_required=captions_required, **transform
        )
    try:
        import datasets
    except ImportError:
        raise ValueError("--dataset_name needs the `datasets` package: pip install datasets") from None
    rows = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)["train"]
    return ImageTextDataset(rows, args.resolution, args.image_column, args.caption_column, **transform)


class EpochShuffleSampler(Sampler[int]):
    """A permutation of `range(num_items)` that depends only on `(seed, epoch)`: the same on every process (which
    accelerate then shards) and again after a resume, whatever the global RNG holds. Call `set_epoch` first."""

    def __init__(self, num_items: int, seed: int):
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_items, generator=order).tolist())

    def __len__(self) -> int:
        return self.num_items


# ---------------------------------------------------------------------------------------------------- setup


def create_accelerator(args) -> Accelerator:
    """The Accelerator of a run: mixed precision, gradient accumulation, trackers; seeds every RNG with `--seed`.
    Checks `--resume_from_checkpoint` first, before any model is loaded."""
    resume_checkpoint(args)
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # batches come from pinned memory (the Trainer's loader pins them on a GPU): copied without waiting
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        log_with=_trackers(args.report_to),
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        logging_dir.mkdir(parents=True, exist_ok=True)
    return accelerator


def resume_checkpoint(args) -> Optional[Path]:
    """The checkpoint `--resume_from_checkpoint` names (None: a fresh start). A fresh start is refused in an
    `--output_dir` that holds checkpoints: its saves would mix with theirs and `latest` would pick theirs."""
    checkpoint = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint is None and complete_checkpoints(args.output_dir):
        raise ValueError(
            f"{args.output_dir} already holds checkpoints of a run; pass --resume_from_checkpoint latest to "
            "continue it, or choose another --output_dir"
        )
    return checkpoint


def _trackers(report_to: str) -> Optional[List[str]]:
    """The accelerate trackers of `--report_to`. tensorboard, the default, is skipped with a warning when not
    installed (losses.jsonl is always written); a tracker asked for by name otherwise must be installed."""
    if report_to == "none":
        return None
    if report_to == "tensorboard" and not is_tensorboard_available():
        logger.warning("tensorboard is not installed: losses go to logging_dir/losses.jsonl only")
        return None
    if report_to == "wandb" and not is_wandb_available():
        raise ValueError("--report_to wandb needs the `wandb` package: pip install wandb")
    return [report_to]


def build_optimizer(
    parameters: Sequence[Union[torch.nn.Parameter, Dict[str, Any]]], args, learning_rate: Optional[float] = None
):
    """AdamW over `parameters` (tensors, or param groups whose own "lr" overrides the default) with the flags'
    betas, weight decay and epsilon."""
    return torch.optim.AdamW(
        parameters,
        lr=args.learning_rate if learning_rate is None else learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen models can be cast to under the run's mixed precision (trained weights stay float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# ---------------------------------------------------------------------------------------------------- the loop


@dataclass
class Objective:
    """One loss and the optimizer it drives. Every active objective runs on every micro-batch, in list order.

    Args:
        module: The loss module (`forward` returns a `BaseOutput` with a `loss`); the loop prepares it (DDP wraps it).
        optimizer: Its optimizer over `module`'s trainable parameters; the loop prepares it.
        compute: `compute(module, batch, global_step, outputs)` returns the module's output for `batch`; `module` is
            the prepared one, `global_step` the optimizer steps done so far and `outputs` maps the names of the
            objectives already run on this batch to their outputs.
        name: Key of this objective in `outputs`; also the prefix of its logged scalars (none for the first).
        start_step: The global step from which the objective runs (a discriminator starts late).
        lr_scheduler: Built by the loop for the first objective from `--lr_scheduler`; others keep a constant rate.
    """

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    compute: Callable[[torch.nn.Module, Dict[str, Any], int, Dict[str, Any]], Any]
    name: str = "main"
    start_step: int = 0
    lr_scheduler: Any = None


class Trainer:
    """Runs objectives over a dataset with accelerate; see the module docstring.

    Args:
        args: The parsed flags shared by both trainers (see `cli/training_arguments.py`).
        accelerator: From `create_accelerator(args)`.
        objectives: What to optimize; the first one is the main one (its lr schedule, its model's EMA).
        dataset: Items for `collate_image_text`.
        trained_model: The unwrapped module of the first objective, or the model in it, whose trainable parameters
            EMA follows (the final save writes them with their EMA weights).
        validate: `validate(global_step)` called on the main process every `--validation_steps` and at the end,
            with EMA weights in place; returns scalars to log, or None.
        save_final: `save_final()` called on the main process at the end, with EMA weights in place.
        collate_fn: Makes a batch of dataset items (default `collate_image_text`); it runs in the loader's workers.
    """

    def __init__(
        self,
        args,
        accelerator: Accelerator,
        objectives: List[Objective],
        dataset: Dataset,
        trained_model: torch.nn.Module,
        validate: Optional[Callable[[int], Optional[Dict[str, float]]]] = None,
        save_final: Optional[Callable[[], None]] = None,
        collate_fn: Callable[[List[Dict[str, Any]]], Dict[str, Any]] = collate_image_text,
    ):
        self.args = args
        self.accelerator = accelerator
        self.objectives = objectives
        self.trained_model = trained_model
        self.validate = validate
        self.save_final = save_final
        self.output_dir = Path(args.output_dir)
        self.logging_dir = self.output_dir / args.logging_dir
        if len(dataset) == 0:
            raise ValueError("the training set is empty")

        self.sampler = EpochShuffleSampler(len(dataset), args.seed)
        # The loader's own generator draws its workers' base seed; from the global RNG that draw would shift the
        # training stream by one each time an epoch starts, and at a resume.
        self.loader_generator = torch.Generator()
        dataloader = DataLoader(
            dataset,
            batch_size=args.train_batch_size,
            sampler=self.sampler,
            collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers,
            # workers kept from one epoch to the next rather than started anew for each
            persistent_workers=args.dataloader_num_workers > 0,
            pin_memory=accelerator.device.type == "cuda",
            generator=self.loader_generator,
        )
        self._prepare(dataloader)
        self.ema = self._create_ema() if args.use_ema else None

    # ------------------------------------------------------------------ setup
    def _prepare(self, dataloader: DataLoader) -> None:
        args, accelerator = self.args, self.accelerator
        # what each objective's gradient clipping covers: its optimizer's parameters
        self.clipped = [[p for group in o.optimizer.param_groups for p in group["params"]] for o in self.objectives]
        # The schedule counts optimizer steps; accelerate steps a prepared scheduler once per process per step,
        # so its lengths are scaled by the process count (as in diffusers' scripts).
        steps_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        main = self.objectives[0]
        main.lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=main.optimizer,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes,
        )
        prepared = accelerator.prepare(
            *[o.module for o in self.objectives], *[o.optimizer for o in self.objectives], dataloader, main.lr_scheduler
        )
        n = len(self.objectives)
        for i, objective in enumerate(self.objectives):
            objective.module, objective.optimizer = prepared[i], prepared[n + i]
        self.dataloader, main.lr_scheduler = prepared[2 * n], prepared[2 * n + 1]
        # the prepared loader holds this process's shard: its length is what one epoch steps through
        self.steps_per_epoch = math.ceil(len(self.dataloader) / args.gradient_accumulation_steps)
        self.max_train_steps = args.max_train_steps or args.num_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)

    def _create_ema(self) -> EMAModel:
        self.ema_parameters = [p for p in self.trained_model.parameters() if p.requires_grad]
        ema = EMAModel(self.ema_parameters, decay=self.args.ema_decay, foreach=True)
        ema.to(self.accelerator.device)
        # saved and restored with every checkpoint
        self.accelerator.register_for_checkpointing(ema)
        return ema

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The trained model holds its EMA weights inside the block (plain weights without `--use_ema`)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.ema_parameters)
        self.ema.copy_to(self.ema_parameters)
        try:
            yield
        finally:
            self.ema.restore(self.ema_parameters)

    def _resume(self) -> int:
        """Load `--resume_from_checkpoint` and return its global step (0 for a fresh start)."""
        checkpoint = resume_checkpoint(self.args)
        if checkpoint is None:
            return 0
        logger.info(f"Resuming from {checkpoint}")
        self.accelerator.load_state(str(checkpoint))
        if self.ema is not None:
            self.ema.to(self.accelerator.device)  # accelerate loads custom states on the CPU
        return read_checkpoint_step(checkpoint)

    # ------------------------------------------------------------------ logs
    def _start_logs(self, global_step: int) -> None:
        """Trackers, the args file, and the JSONL logs cut back to `global_step`: steps past the checkpoint were
        logged by the run that stopped and are about to be logged again."""
        accelerator = self.accelerator
        if not accelerator.is_main_process:
            return
        scalars = {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(self.args.tracker_project_name, config=scalars)
        (self.output_dir / ARGS_FILE).write_text(json.dumps(vars(self.args), indent=2, default=str) + "\n")
        for name in (LOSSES_FILE, VALIDATION_FILE):
            _truncate_jsonl(self.logging_dir / name, global_step)

    def _log(self, name: str, record: Dict[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.logging_dir / name, "a") as log:
            log.write(json.dumps({"step": step, **record}) + "\n")
        self.accelerator.log(record, step=step)

    # ------------------------------------------------------------------ steps
    def _micro_step(self, batch: Dict[str, Any], global_step: int, sums: Dict[str, torch.Tensor]) -> None:
        """Forward, backward and (when the accumulation window is full) an optimizer step of each active
        objective; adds its scalar outputs to `sums`."""
        accelerator, outputs = self.accelerator, {}
        for index, objective in enumerate(self.objectives):
            if global_step < objective.start_step:
                continue
            output = objective.compute(objective.module, batch, global_step, outputs)
            accelerator.backward(output.loss)
            if accelerator.sync_gradients and self.args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.clipped[index], self.args.max_grad_norm)
            objective.optimizer.step()
            if objective.lr_scheduler is not None:
                objective.lr_scheduler.step()
            objective.optimizer.zero_grad(set_to_none=True)
            outputs[objective.name] = output
            prefix = "" if index == 0 else f"{objective.name}_"
            for key, value in output.items():
                if isinstance(value, torch.Tensor) and value.dim() == 0:
                    sums[prefix + key] = sums.get(prefix + key, 0.0) + value.detach().float()
        sums["_count"] = sums.get("_count", 0.0) + 1.0

    def _queue_step_record(self, global_step: int, sums: Dict[str, torch.Tensor], deadline: Optional[float]) -> None:
        """Start reading step `global_step`'s record (`_read_step_record` finishes it): the mean of every scalar over
        the step's micro-batches and all processes, the learning rate, and whether any process is past `deadline`.

        The values are copied to the host without waiting: the loop reads them one step later, so the device runs a
        step while the host queues the next, where reading them at once would leave one of the two idle."""
        count = sums.pop("_count")
        keys = sorted(sums)
        device = self.accelerator.device
        late = float(deadline is not None and time.monotonic() > deadline)
        values = [torch.as_tensor(sums[k], device=device).float() / count for k in keys]
        local = torch.stack(values + [torch.full((), late, device=device)])
        reduced = self.accelerator.reduce(local, reduction="mean")
        if device.type == "cuda":
            host = torch.empty(reduced.shape, dtype=reduced.dtype, pin_memory=True)
            host.copy_(reduced, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host, copied = reduced, None
        lr = self.objectives[0].lr_scheduler.get_last_lr()[0]
        self._pending_record = (global_step, keys, host, copied, lr)

    def _read_step_record(self, progress) -> Optional[bool]:
        """Log the queued step record; returns whether a process was past the deadline at that step (None: nothing was
        queued). Every process reads the same reduced values, so all of them stop at the same step."""
        if self._pending_record is None:
            return None
        global_step, keys, host, copied, lr = self._pending_record
        self._pending_record = None
        self._last_read_step = global_step
        if copied is not None:
            copied.synchronize()
        *means, late = host.tolist()
        record = dict(zip(keys, means))
        record["lr"] = lr
        self._log(LOSSES_FILE, record, global_step)
        progress.update(global_step - progress.n)
        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        return late > 0

    def _run_validation(self, global_step: int) -> None:
        if self.validate is None:
            return
        if self.accelerator.is_main_process:
            # on a forked RNG: validating (or not) leaves the training draws as they are
            devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), self.ema_weights():
                metrics = self.validate(global_step)
            if metrics:
                self._log(VALIDATION_FILE, metrics, global_step)
        self.accelerator.wait_for_everyone()

    def _end_step(self, global_step: int, sums: Dict[str, torch.Tensor], deadline: Optional[float], progress):
        """After optimizer step `global_step`: EMA update, the step's record queued and the previous one logged,
        checkpoint and validation when due. Returns `(validated, out_of_time)`: whether it validated, and whether the
        logged record was past `deadline`."""
        args = self.args
        if self.ema is not None:
            self.ema.step(self.ema_parameters)
        out_of_time = self._read_step_record(progress)
        self._queue_step_record(global_step, sums, deadline)
        checkpoint = global_step % args.checkpointing_steps == 0
        validated = bool(args.validation_steps) and global_step % args.validation_steps == 0
        if checkpoint or validated:  # the step's own record first: a kill after the save must not lose it
            out_of_time = self._read_step_record(progress)
        if checkpoint:
            save_checkpoint(self.accelerator, self.output_dir, global_step, args.checkpoints_total_limit)
        if validated:
            self._run_validation(global_step)
        return validated, bool(out_of_time)

    def _write_summary(self, global_step: int, timed_from) -> None:
        """`logging_dir/run_summary.json`: training images per second over the steps after the first (wall clock,
        logging and checkpoints included) and each process's peak accelerator memory."""
        accelerator, args = self.accelerator, self.args
        device = accelerator.device
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        peaks = accelerator.gather(torch.tensor([peak / 2**30], device=device)).tolist()
        if not accelerator.is_main_process or timed_from is None:
            return
        steps, seconds = global_step - timed_from[0], time.monotonic() - timed_from[1]
        images_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        summary = {
            "global_step": global_step,
            "timed_steps": steps,
            "timed_seconds": seconds,
            "images_per_step": images_per_step,
            "images_per_second": steps * images_per_step / seconds if steps and seconds > 0 else None,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "peak_memory_gib_per_process": peaks if device.type == "cuda" else None,
        }
        (self.logging_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(f"throughput: {summary['images_per_second']} images/s over {steps} steps")

    # ------------------------------------------------------------------ run
    def train(self) -> int:
        """Train to `max_train_steps`, checkpointing and validating on the way; returns the last global step."""
        args, accelerator = self.args, self.accelerator
        global_step = self._resume()
        self._start_logs(global_step)
        first_epoch = global_step // self.steps_per_epoch
        skip_batches = (global_step % self.steps_per_epoch) * args.gradient_accumulation_steps
        progress = tqdm(
            total=self.max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
        )
        validated_at = None
        deadline = None if args.max_train_seconds is None else time.monotonic() + args.max_train_seconds
        out_of_time = False
        self._pending_record = self._last_read_step = None
        # (step, time) once the run's first step is done (its record read): warm-up and compilation stay out
        timed_from = None
        for module in (o.module for o in self.objectives):
            module.train()
        for epoch in range(first_epoch, self.num_epochs):
            if global_step >= self.max_train_steps or out_of_time:
                break
            self.sampler.set_epoch(epoch)
            self.dataloader.set_epoch(epoch)  # accelerate would otherwise reset the sampler to its own count
            self.loader_generator.manual_seed(args.seed + epoch)
            loader = self.dataloader
            if epoch == first_epoch and skip_batches:
                loader = accelerator.skip_first_batches(self.dataloader, skip_batches)
            sums = {}
            for batch in loader:
                with accelerator.accumulate(*[o.module for o in self.objectives]):
                    self._micro_step(batch, global_step, sums)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                validated, out_of_time = self._end_step(global_step, sums, deadline, progress)
                if validated:
                    validated_at = global_step
                sums = {}
                if timed_from is None and self._last_read_step is not None:
                    timed_from = (self._last_read_step, time.monotonic())
                if global_step >= self.max_train_steps or out_of_time:
                    break
        self._read_step_record(progress)
        progress.close()
        self._write_summary(global_step, timed_from)
        if out_of_time:
            logger.info(f"--max_train_seconds {args.max_train_seconds} reached at step {global_step}: stopping there")
            if global_step % args.checkpointing_steps != 0:  # so that `--resume_from_checkpoint latest` goes on
                save_checkpoint(self.accelerator, self.output_dir, global_step, args.checkpoints_total_limit)
        if validated_at != global_step:
            self._run_validation(global_step)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and self.save_final is not None:
            with self.ema_weights():
                self.save_final()
        _let_gloo_workers_settle(accelerator)
        accelerator.end_training()
        return global_step


def _let_gloo_workers_settle(accelerator: Accelerator) -> None:
    """Give gloo's worker threads the GIL once more before the process group can be destroyed.

    A gloo worker frees a finished collective (with the tensors of the earlier ones it waited for) after `wait()` has
    returned, and freeing a tensor that Python has already dropped takes the GIL. The group's destructor joins those
    threads while holding the GIL: when a process reaches it straight from its last barrier (every process but the one
    that saves the model), the worker still waits for the GIL and the process hangs at exit (torch 2.13: 3 of 44
    two-process CPU runs of the tokenizer trainer hung without this, none of 90 with it). Sleeping releases the GIL
    and lets the worker finish.
    """
    if accelerator.num_processes > 1 and torch.distributed.get_backend() == "gloo":
        time.sleep(0.1)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of `path` up to `last_step` (none for a fresh start), rewritten atomically."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)
