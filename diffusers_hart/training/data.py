"""Image-text pairs for training: an imagefolder on disk or a `datasets.Dataset`-like object, as tensors.

Both sources give items `{"pixel_values": (3, size, size) float tensor in [-1, 1], "text": str}` through one
transform, `image_to_tensor` (RGB, short side resized to `size`, square crop, optional flip), and batch with
`collate_image_text`. Torch, PIL and numpy only: Hugging Face `datasets` is not imported; anything with `len()` and
`__getitem__` returning a dict of columns works.

Bad images follow `on_bad_image`: "error" raises `ValueError` naming the file when the item is read; "skip" checks
every image once at construction, so that `len()` is exact and the same on every process, and drops the unreadable
ones with a single warning.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
METADATA_FILE = "metadata.jsonl"
# How many skipped names the warning lists; the count covers the rest.
_SKIPPED_NAMES_SHOWN = 5
# What PIL raises for a missing, truncated, unidentifiable or oversized file (PIL.UnidentifiedImageError is an
# OSError; verify() raises SyntaxError for some broken formats).
_UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

ImageSource = Union[Image.Image, str, os.PathLike]


def image_to_tensor(
    image: Image.Image,
    size: int,
    center_crop: bool = True,
    generator: Optional[torch.Generator] = None,
    flip: bool = False,
) -> torch.Tensor:
    """A PIL image as a (3, size, size) float tensor in [-1, 1].

    The image is converted to RGB, resized (bicubic; PIL antialiases when it shrinks) so that its short side is
    `size`, then cropped to a square: centred, or at a random offset drawn from `generator` (the global torch RNG when
    None, which DataLoader seeds per worker) with `center_crop=False`. `flip=True` mirrors it left to right.
    """
    image = image.convert("RGB")
    width, height = image.size
    # The short side is set exactly; the long one, rounded from a ratio >= 1, is never shorter than `size`.
    resized = (size, round(height * size / width)) if width <= height else (round(width * size / height), size)
    image = image.resize(resized, Image.Resampling.BICUBIC)
    spare_x, spare_y = resized[0] - size, resized[1] - size
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(spare_y + 1, (1,), generator=generator))
    image = image.crop((left, top, left + size, top + size))
    pixels_HWC = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    pixels = pixels_HWC.permute(2, 0, 1)
    return pixels.flip(-1) if flip else pixels


def tensor_to_image(images: torch.Tensor) -> Image.Image:
    """The inverse of `image_to_tensor`: (B, 3, H, W) in [-1, 1], side by side as one RGB image."""
    row = torch.cat(list(images.float().clamp(-1, 1).add(1).mul(127.5).round().byte().cpu()), dim=-1)
    return Image.fromarray(row.permute(1, 2, 0).numpy())


def collate_image_text(batch: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Items of `ImageTextFolder`/`ImageTextDataset` as `{"pixel_values": (B, 3, H, W), "texts": list of B str}`."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "texts": [item["text"] for item in batch],
    }


def _load_image(source: ImageSource, name: str) -> Image.Image:
    """`source` (a PIL image or a path) with its pixels decoded; `ValueError("cannot read image NAME: REASON")` if
    they cannot be. Decoding here, not in the transform, is what turns a truncated file into that error."""
    try:
        if isinstance(source, Image.Image):
            source.load()
            return source
        with Image.open(source) as image:  # the `with` closes the file; the decoded pixels stay
            image.load()
            return image
    except _UNREADABLE_IMAGE_ERRORS as error:
        raise ValueError(f"cannot read image {name}: {error}") from error


def _is_readable(source: ImageSource) -> bool:
    """Whether `source` looks like a valid image: PIL's `verify()` checks the file's structure without decoding.

    An image already in memory counts as readable: whoever made it (e.g. `datasets`) has decoded it.
    """
    if isinstance(source, Image.Image):
        return True
    try:
        with Image.open(source) as image:
            image.verify()
    except _UNREADABLE_IMAGE_ERRORS:
        return False
    return True


class _ImageTextItems(Dataset):
    """What both datasets share: the transform settings, the bad-image policy and building one item."""

    def __init__(
        self,
        size: int,
        on_bad_image: str,
        center_crop: bool,
        random_flip: bool,
        generator: Optional[torch.Generator],
    ):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        self.size = size
        self.on_bad_image = on_bad_image
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.generator = generator

    def _keep_readable(
        self, entries: List[Any], source_and_name: Callable[[Any], Tuple[ImageSource, str]]
    ) -> List[Any]:
        """`entries` without those whose image is unreadable when skipping; one warning names the first few."""
        if self.on_bad_image != "skip":
            return entries
        kept, skipped = [], []
        for entry in entries:
            source, name = source_and_name(entry)
            if _is_readable(source):
                kept.append(entry)
            else:
                skipped.append(name)
        if skipped:
            shown = ", ".join(skipped[:_SKIPPED_NAMES_SHOWN])
            more = f" and {len(skipped) - _SKIPPED_NAMES_SHOWN} more" if len(skipped) > _SKIPPED_NAMES_SHOWN else ""
            logger.warning(f"skipped {len(skipped)} unreadable image(s) of {len(entries)}: {shown}{more}")
        return kept

    def _item(self, source: ImageSource, text: str, name: str) -> Dict[str, Any]:
        image = _load_image(source, name)
        flip = self.random_flip and bool(torch.rand(1, generator=self.generator) < 0.5)
        pixel_values = image_to_tensor(image, self.size, self.center_crop, self.generator, flip)
        return {"pixel_values": pixel_values, "text": text}


class ImageTextFolder(_ImageTextItems):
    """A Hugging Face imagefolder: `folder/metadata.jsonl` lines `{"file_name": ..., "text": ...}`, file names
    relative to `folder`; items `{"pixel_values": (3, size, size) in [-1, 1], "text": str}`.

    Args:
        folder: the folder holding `metadata.jsonl` and the images.
        size: the side of the square images returned.
        on_bad_image: "error" raises `ValueError` naming the file when an unreadable or missing image is read;
            "skip" drops such images at construction (`PIL.Image.verify`, no decoding) and warns once.
        center_crop: crop the centre of the resized image; False crops at a random offset.
        random_flip: mirror each image left to right with probability 1/2.
        generator: the RNG of random crops and flips; None uses the global torch RNG, which DataLoader seeds
            differently in each worker (a generator given here would be copied, state and all, into every worker).
    """

    def __init__(
        self,
        folder: Union[str, os.PathLike],
        size: int,
        on_bad_image: str = "error",
        center_crop: bool = True,
        random_flip: bool = False,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__(size, on_bad_image, center_crop, random_flip, generator)
        self.folder = Path(folder)
        pairs = [(self.folder / file_name, text) for file_name, text in read_metadata(self.folder)]
        self.pairs = self._keep_readable(pairs, lambda pair: (pair[0], str(pair[0])))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        path, text = self.pairs[index]
        return self._item(path, text, str(path))


def read_metadata(folder: Union[str, os.PathLike]) -> List[Tuple[str, str]]:
    """(file_name, text) per line of an imagefolder's `metadata.jsonl`; `ValueError` naming the file and line."""
    metadata = Path(folder) / METADATA_FILE
    if not metadata.is_file():
        raise ValueError(f'missing {metadata}: an imagefolder needs one, with lines {{"file_name": ..., "text": ...}}')
    pairs = []
    with open(metadata, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{metadata}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not JSON ({error})") from error
            if not isinstance(record, dict):
                raise ValueError(f'{where}: expected a JSON object with "file_name" and "text"')
            for key in ("file_name", "text"):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{where}: missing or non-string {key!r}")
            pairs.append((record["file_name"], record["text"]))
    return pairs


def write_metadata(folder: Union[str, os.PathLike], pairs: Sequence[Tuple[str, str]]) -> None:
    """Write `folder/metadata.jsonl`, one `{"file_name", "text"}` line per (file_name, text): what `read_metadata`
    reads back."""
    lines = [json.dumps({"file_name": file_name, "text": text}) + "\n" for file_name, text in pairs]
    (Path(folder) / METADATA_FILE).write_text("".join(lines), encoding="utf-8")


class ImageTextDataset(_ImageTextItems):
    """Image-text pairs from a `datasets.Dataset`-like object: `len()` and `dataset[i]` a dict whose
    `image_column` holds a PIL image or a path and whose `text_column` holds a str.

    Args:
        dataset: the rows; `datasets.Dataset`, a list of dicts, anything indexable with a length.
        size, on_bad_image, center_crop, random_flip, generator: as in `ImageTextFolder`. With "skip", every row is
            read once at construction (images given as paths are verified, not decoded; PIL images count as read).
        image_column: the column holding the image.
        text_column: the column holding the caption.
    """

    def __init__(
        self,
        dataset,
        size: int,
        image_column: str = "image",
        text_column: str = "text",
        on_bad_image: str = "error",
        center_crop: bool = True,
        random_flip: bool = False,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__(size, on_bad_image, center_crop, random_flip, generator)
        _check_columns(dataset, (image_column, text_column))
        self.dataset = dataset
        self.image_column = image_column
        self.text_column = text_column
        self.rows = self._keep_readable(list(range(len(dataset))), lambda row: self._image(row, dataset[row]))

    def _image(self, row: int, record: Dict[str, Any]) -> Tuple[ImageSource, str]:
        """The image of `record` (row `row`) and its name for messages: the row, and the path if it is one."""
        source = record[self.image_column]
        return source, f"row {row}" if isinstance(source, Image.Image) else f"row {row} ({source})"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        row = self.rows[index]
        record = self.dataset[row]
        text = record[self.text_column]
        if not isinstance(text, str):
            raise ValueError(f"row {row}: column {self.text_column!r} holds {type(text).__name__}, expected str")
        source, name = self._image(row, record)
        return self._item(source, text, name)


def _check_columns(dataset, required: Sequence[str]) -> None:
    """`ValueError` naming each column of `required` that `dataset` lacks, and listing the ones it has.

    The columns are `dataset.column_names` (as `datasets.Dataset` has) or else the keys of row 0; an empty dataset
    without `column_names` has nothing to check.
    """
    if hasattr(dataset, "column_names"):
        available = list(dataset.column_names)
    elif len(dataset) > 0:
        available = list(dataset[0].keys())
    else:
        return
    missing = [column for column in required if column not in available]
    if missing:
        raise ValueError(f"dataset has no column {', '.join(map(repr, missing))}; its columns are {available}")
