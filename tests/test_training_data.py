"""The training data layer: imagefolder and datasets-like sources, the shared transform, bad images, collation."""

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffusers_hart.training.data import ImageTextDataset, ImageTextFolder, collate_image_text, image_to_tensor

SIZE = 16
RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def _split_image(size, first, second, vertical_split=True):
    """An RGB image whose left (or top) half is `first` and right (or bottom) half is `second`."""
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    if vertical_split:
        pixels[:, : width // 2], pixels[:, width // 2 :] = first, second
    else:
        pixels[: height // 2], pixels[height // 2 :] = first, second
    return Image.fromarray(pixels)


def _as_tensor_colour(rgb):
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1.0


def _write_folder(folder, images, lines=None):
    """Save `images` ({file_name: PIL image}) and a metadata.jsonl (one line each, or the raw `lines`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / name)
    if lines is None:
        lines = [json.dumps({"file_name": name, "text": f"caption of {name}"}) for name in images]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def folder(tmp_path):
    """A wide red|blue, a tall green/white (in a subfolder) and a small upscaled grey image."""
    (tmp_path / "data" / "sub").mkdir(parents=True)
    return _write_folder(
        tmp_path / "data",
        {
            "wide.png": _split_image((64, 32), RED, BLUE),
            "sub/tall.png": _split_image((32, 64), GREEN, WHITE, vertical_split=False),
            "small.png": Image.new("L", (5, 7), 128),
        },
    )


@pytest.fixture
def bad_folder(tmp_path):
    """Two good images, then a truncated PNG, a file that is no image and a file that does not exist."""
    folder = _write_folder(tmp_path / "bad", {"good_a.png": Image.new("RGB", (20, 30), RED)})
    Image.new("RGB", (30, 20), BLUE).save(folder / "good_b.png")
    Image.new("RGB", (30, 30), GREEN).save(folder / "truncated.png")
    data = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "garbage.png").write_bytes(b"not an image")
    names = ["good_a.png", "truncated.png", "good_b.png", "garbage.png", "missing.png"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in names))
    return folder


def test_folder_items_are_square_tensors_in_range_with_their_text(folder):
    dataset = ImageTextFolder(folder, SIZE)
    assert len(dataset) == 3
    for item, name in zip(dataset, ["wide.png", "sub/tall.png", "small.png"]):
        assert item["pixel_values"].shape == (3, SIZE, SIZE)
        assert item["pixel_values"].dtype == torch.float32
        assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
        assert item["text"] == f"caption of {name}"
    # The grey image was single-channel and smaller than `size`: upscaled, three equal channels of 128.
    torch.testing.assert_close(dataset[2]["pixel_values"], torch.full((3, SIZE, SIZE), 128 / 127.5 - 1.0))


def test_split_patterns_survive_resize_and_center_crop(folder):
    dataset = ImageTextFolder(folder, SIZE)
    # wide 64x32 -> 32x16, centre crop keeps columns 8..24: red left half, blue right half (away from the seam).
    wide = dataset[0]["pixel_values"]
    torch.testing.assert_close(wide[:, :, :6], _as_tensor_colour(RED).expand(3, SIZE, 6), atol=0.02, rtol=0)
    torch.testing.assert_close(wide[:, :, -6:], _as_tensor_colour(BLUE).expand(3, SIZE, 6), atol=0.02, rtol=0)
    # tall 32x64 -> 16x32, centre crop keeps rows 8..24: green top half, white bottom half.
    tall = dataset[1]["pixel_values"]
    torch.testing.assert_close(tall[:, :6], _as_tensor_colour(GREEN).expand(3, 6, SIZE), atol=0.02, rtol=0)
    torch.testing.assert_close(tall[:, -6:], _as_tensor_colour(WHITE).expand(3, 6, SIZE), atol=0.02, rtol=0)


def test_image_to_tensor_maps_bytes_to_minus_one_one_channels_first():
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    tensor = image_to_tensor(Image.fromarray(pixels), SIZE)  # already the right size: no resampling
    expected = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    torch.testing.assert_close(tensor, expected)
    torch.testing.assert_close(image_to_tensor(Image.fromarray(pixels), SIZE, flip=True), expected.flip(-1))


def _row_numbered_image(height):
    """A SIZE-wide grey image whose row r has the value r, so a crop reveals its offset."""
    return Image.fromarray(np.repeat(np.arange(height, dtype=np.uint8)[:, None], SIZE, axis=1))


def _crop_top(tensor):
    rows = ((tensor[0, :, 0] + 1.0) * 127.5).round().long()
    assert torch.equal(rows, torch.arange(rows[0], rows[0] + SIZE)), "the crop is not a window of whole rows"
    return int(rows[0])


def test_center_crop_takes_the_middle_and_random_crop_follows_the_generator():
    image = _row_numbered_image(48)
    assert _crop_top(image_to_tensor(image, SIZE)) == 16
    tops = [_crop_top(image_to_tensor(image, SIZE, center_crop=False, generator=torch.Generator().manual_seed(s)))
            for s in range(20)]  # fmt: skip
    assert all(0 <= top <= 32 for top in tops) and len(set(tops)) > 3
    again = [_crop_top(image_to_tensor(image, SIZE, center_crop=False, generator=torch.Generator().manual_seed(s)))
             for s in range(20)]  # fmt: skip
    assert again == tops


def test_random_flip_flips_some_items_and_only_those(tmp_path):
    folder = _write_folder(tmp_path, {"split.png": _split_image((SIZE, SIZE), RED, BLUE)})
    unflipped = ImageTextFolder(folder, SIZE)[0]["pixel_values"]
    dataset = ImageTextFolder(folder, SIZE, random_flip=True, generator=torch.Generator().manual_seed(0))
    draws = [dataset[0]["pixel_values"] for _ in range(20)]
    flipped = [torch.equal(draw, unflipped.flip(-1)) for draw in draws]
    assert all(flip or torch.equal(draw, unflipped) for flip, draw in zip(flipped, draws))
    assert 0 < sum(flipped) < len(draws)


@pytest.mark.parametrize("index, name", [(1, "truncated.png"), (3, "garbage.png"), (4, "missing.png")])
def test_unreadable_image_with_error_names_the_file(bad_folder, index, name):
    dataset = ImageTextFolder(bad_folder, SIZE, on_bad_image="error")
    assert len(dataset) == 5
    assert dataset[0]["text"] == "good_a.png"
    with pytest.raises(ValueError, match=rf"cannot read image .*{name}"):
        dataset[index]


def test_unreadable_images_with_skip_are_dropped_with_one_warning(bad_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusers_hart.training.data"):
        dataset = ImageTextFolder(bad_folder, SIZE, on_bad_image="skip")
    assert len(dataset) == 2
    assert [item["text"] for item in dataset] == ["good_a.png", "good_b.png"]
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "skipped 3 " in message and all(name in message for name in ("truncated.png", "garbage.png", "missing.png"))


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"file_name": "a.png", "text": "a"}', "{not json"], r"metadata\.jsonl, line 2: not JSON"),
        (['{"file_name": "a.png", "text": "a"}', "", '{"file_name": "a.png"}'], r"metadata\.jsonl, line 3: .*'text'"),
        (['{"text": "a"}'], r"metadata\.jsonl, line 1: .*'file_name'"),
        (['["a.png", "a"]'], r"metadata\.jsonl, line 1: expected a JSON object"),
    ],
)
def test_bad_metadata_line_names_file_and_line(tmp_path, lines, match):
    folder = _write_folder(tmp_path, {"a.png": Image.new("RGB", (SIZE, SIZE))}, lines)
    with pytest.raises(ValueError, match=match):
        ImageTextFolder(folder, SIZE)


def test_missing_metadata_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"missing .*metadata\.jsonl"):
        ImageTextFolder(tmp_path, SIZE)


@pytest.mark.parametrize("arguments", [{"on_bad_image": "ignore"}, {"size": 0}])
def test_bad_arguments_are_refused(folder, arguments):
    with pytest.raises(ValueError, match=next(iter(arguments))):
        ImageTextFolder(folder, **{"size": SIZE, **arguments})


def test_datasets_like_rows_with_custom_columns(tmp_path):
    path = tmp_path / "on_disk.png"
    _split_image((40, 20), RED, BLUE).save(path)
    in_memory = _split_image((20, 40), GREEN, WHITE, vertical_split=False)
    rows = [{"picture": in_memory, "caption": "in memory", "id": 0}, {"picture": str(path), "caption": "on disk"}]
    dataset = ImageTextDataset(rows, SIZE, image_column="picture", text_column="caption")
    assert len(dataset) == 2
    assert dataset[0]["text"] == "in memory" and dataset[1]["text"] == "on disk"
    torch.testing.assert_close(dataset[0]["pixel_values"], image_to_tensor(in_memory, SIZE))
    torch.testing.assert_close(dataset[1]["pixel_values"], image_to_tensor(Image.open(path), SIZE))


class _ColumnNamedRows(list):
    """A stand-in for `datasets.Dataset`: rows plus `column_names`."""

    column_names = ("img", "prompt")


@pytest.mark.parametrize(
    "rows", [[{"img": Image.new("RGB", (SIZE, SIZE)), "prompt": "p"}], _ColumnNamedRows()], ids=["row0", "column_names"]
)
def test_missing_column_is_named_with_the_available_ones(rows):
    with pytest.raises(ValueError, match=r"no column 'caption'; its columns are \['img', 'prompt'\]"):
        ImageTextDataset(rows, SIZE, image_column="img", text_column="caption")


def test_datasets_like_rows_skip_and_error_on_bad_paths(bad_folder):
    rows = [{"image": str(bad_folder / name), "text": name} for name in ("good_a.png", "garbage.png", "good_b.png")]
    with pytest.raises(ValueError, match=r"cannot read image row 1 \(.*garbage\.png\)"):
        ImageTextDataset(rows, SIZE)[1]
    in_memory = {"image": Image.new("RGB", (SIZE, SIZE)), "text": "in memory"}  # already decoded: kept unchecked
    skipping = ImageTextDataset([*rows, in_memory], SIZE, on_bad_image="skip")
    assert [item["text"] for item in skipping] == ["good_a.png", "good_b.png", "in memory"]


def test_lazily_decoded_in_memory_image_that_fails_names_the_row(bad_folder):
    lazy = Image.open(io.BytesIO((bad_folder / "truncated.png").read_bytes()))  # header read, pixels not yet
    with pytest.raises(ValueError, match=r"cannot read image row 0: image file is truncated"):
        ImageTextDataset([{"image": lazy, "text": "t"}], SIZE)[0]


def test_non_string_text_is_refused():
    dataset = ImageTextDataset([{"image": Image.new("RGB", (SIZE, SIZE)), "text": ["a", "b"]}], SIZE)
    with pytest.raises(ValueError, match=r"row 0: column 'text' holds list"):
        dataset[0]


def test_collate_stacks_pixels_and_lists_texts():
    items = [{"pixel_values": torch.full((3, SIZE, SIZE), float(i)), "text": f"t{i}"} for i in range(3)]
    batch = collate_image_text(items)
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert batch["texts"] == ["t0", "t1", "t2"]


def test_dataloader_iterates_the_folder_in_batches(folder):
    loader = DataLoader(ImageTextFolder(folder, SIZE), batch_size=2, num_workers=0, collate_fn=collate_image_text)
    batches = list(loader)
    assert [batch["pixel_values"].shape for batch in batches] == [(2, 3, SIZE, SIZE), (1, 3, SIZE, SIZE)]
    texts = [text for batch in batches for text in batch["texts"]]
    assert texts == [f"caption of {name}" for name in ("wide.png", "sub/tall.png", "small.png")]
