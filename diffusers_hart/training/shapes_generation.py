"""Generate the shapes benchmark's evaluation images with a pipeline, on one process or split across several.

Image `i` is drawn with its own generator seeded `seed + i`, so a folder is the same whatever the number of
processes and the batch size. Each process writes its share of the PNGs; the main process writes `metadata.jsonl`
once all are done, so the folder is an imagefolder that `evaluate_folder` (and `hart-eval-shapes`) reads.
"""

from pathlib import Path
from typing import Sequence, Union

import torch
from accelerate import PartialState

from .data import write_metadata


def _image_name(index: int) -> str:
    return f"{index:06d}.png"


@torch.no_grad()
def generate_folder(
    pipe,
    prompts: Sequence[str],
    folder: Union[str, Path],
    batch_size: int = 50,
    seed: int = 0,
    **pipeline_kwargs,
) -> Path:
    """Write one image per prompt into `folder` (created if needed) plus its `metadata.jsonl`.

    Under `accelerate launch` every process takes a contiguous share of the prompts
    (`PartialState().split_between_processes`) and generates it on its own device; `pipe` must already be there.
    Extra keyword arguments go to the pipeline call (`guidance_scale`, `num_inference_steps`, ...).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    folder = Path(folder)
    state = PartialState()
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    indices = list(range(len(prompts)))
    with state.split_between_processes(indices) as own:
        for start in range(0, len(own), batch_size):
            chunk = own[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed + index) for index in chunk]
            images = pipe([prompts[index] for index in chunk], generator=generators, **pipeline_kwargs).images
            for index, image in zip(chunk, images):
                image.save(folder / _image_name(index))
    state.wait_for_everyone()
    if state.is_main_process:
        write_metadata(folder, [(_image_name(i), prompts[i]) for i in indices])
    state.wait_for_everyone()
    return folder
