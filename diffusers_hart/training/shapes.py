"""A synthetic text-to-image benchmark: coloured shapes on black, exact captions, and an analytic evaluator.

A scene is one or two filled shapes, each in its own quadrant of the image, and has exactly one caption:

    a red circle at the top left and a blue square at the bottom right

(objects in the reading order of their quadrants). Some (colour, shape) pairs are held out: training scenes never
contain them and evaluation scenes always contain at least one, so the evaluation split asks for compositions the
model never saw. Datasets are Hugging Face imagefolders: PNGs plus `metadata.jsonl` lines `{"file_name", "text"}`.

The evaluator is analytic, no learned model: foreground pixels are the bright ones, each connected component not
smaller than a speck is an object; its colour is its mean hue (white: a low saturation), its shape is read from its
rotational symmetry (3-fold: triangle, 4-fold: square, any: circle; see the thresholds below), its position is the
quadrant of its centroid. Hue and saturation do not change where a colour blends into the black background, and
blur or rotation keep a shape's symmetry, so soft, noisy or turned images are judged like clean ones.

Everything here is numpy + PIL and deterministic given a seed.
"""

import colorsys
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from .data import METADATA_FILE, read_metadata, write_metadata

# The vocabulary.
# Hues at least 55 degrees apart (red 0, yellow 56, green 127, blue 229, purple 284) plus white, the only
# unsaturated colour, all bright on black: well separated after blur, noise or a decoder's colour drift.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 35, 35),
    "green": (35, 200, 55),
    "blue": (40, 80, 250),
    "yellow": (235, 220, 35),
    "white": (240, 240, 240),
    "purple": (180, 40, 230),
}
BACKGROUND = (0, 0, 0)
COLOUR_NAMES = tuple(COLOURS)
# Colours that a training set may add (`auxiliary_colours`), between the palette's hues (orange 30, lime 86, cyan
# 183, pink 323). No evaluation prompt asks for them and the evaluator does not name them. Each comes with every
# shape, so that in such a set most colours are seen with all three shapes and a colour is no cue for a shape: the
# held-out pairs stay held out, their colours and shapes just stop predicting each other.
AUXILIARY_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "orange": (240, 140, 30),
    "lime": (150, 230, 30),
    "cyan": (30, 205, 220),
    "pink": (240, 60, 170),
}
_RENDERED_COLOURS = {**COLOURS, **AUXILIARY_COLOURS}
_ALL_COLOUR_NAMES = tuple(_RENDERED_COLOURS)
SHAPES = ("circle", "square", "triangle")
# Reading order, which is also the order of a caption's objects. Each position is a quadrant: (row, column).
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
_CELLS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
MAX_OBJECTS = 2
# One pair per shape and no colour twice: every colour and every shape still appears in training.
HELD_OUT_PAIRS = frozenset({("green", "triangle"), ("blue", "circle"), ("yellow", "square")})
SPLITS = ("train", "eval")
MIN_SIDE, MAX_SIDE = 64, 256

# Rendering: an object's bounding box spans this fraction of its quadrant's side, and stays this fraction of the
# side away from the quadrant's edges (so two objects are never closer than twice that).
EXTENT_RANGE = (0.5, 0.75)
CELL_MARGIN = 0.08
SUPERSAMPLING = 4  # drawn this many times larger, then box-downsampled: antialiased edges

# The evaluator's thresholds.
FOREGROUND_BRIGHTNESS = 0.35  # max(R, G, B) in [0, 1]; every colour of the palette is above 0.9
# A component smaller than this fraction of the image is a speck, not an object; the smallest rendered object (a
# triangle half a quadrant wide) covers 2.7% of the image.
MIN_OBJECT_AREA = 0.0075
# An object's outline is where its brightness falls to half its own: where a blurred edge was before the blur.
EDGE_LEVEL = 0.5
WHITE_MAX_SATURATION = 0.4  # the palette's chromatic colours have saturation >= 0.8, white 0
MAX_HUE_ERROR = 20.0  # degrees; an orange halfway between red and yellow is neither
# Shapes are told apart by their symmetry. The complex moment c_k = sum over an object's pixels of (z - centroid)^k,
# divided by area^(1 + k/2), does not change with rotation or scale, and is zero for a shape with n-fold symmetry
# unless n divides k: c_2 is zero for all three shapes, c_3 for a circle and a square (not a triangle), c_4 for a
# circle and a triangle (not a square). A symmetric blur keeps the symmetry, so it only shrinks the nonzero ones.
# The scores are |c_3| and |c_4| divided by their values for the ideal triangle and square; a gaussian blur of
# radius 1/32 of the image leaves them above 0.4, a disk's stay under 0.2.
IDEAL_TRIANGLE_C3 = 0.0675  # equilateral triangle, computed numerically
IDEAL_SQUARE_C4 = 1 / 60
MIN_CORNER_SCORE = 0.25  # both scores below this: a circle
# |c_2| / area^2 above this: an elongated blob (a 1.4:1 rectangle or ellipse), none of the three shapes; an isosceles
# triangle as high as it is wide is at 0.028.
MAX_ELONGATION = 0.06


def _hue_degrees(rgb: Tuple[int, int, int]) -> float:
    return 360.0 * colorsys.rgb_to_hsv(*(channel / 255 for channel in rgb))[0]


_HUES = {name: _hue_degrees(rgb) for name, rgb in COLOURS.items() if name != "white"}


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape of a scene; `ValueError` for a word outside the vocabulary."""

    colour: str
    shape: str
    position: str

    def __post_init__(self):
        for kind, word, vocabulary in (
            ("colour", self.colour, _ALL_COLOUR_NAMES), ("shape", self.shape, SHAPES),
            ("position", self.position, POSITIONS),
        ):  # fmt: skip
            if word not in vocabulary:
                raise ValueError(f"unknown {kind} {word!r}; expected one of: {', '.join(vocabulary)}")

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} at the {self.position}"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS


@dataclass(frozen=True)
class Scene:
    """One or two objects at distinct positions, stored in caption order whatever order they are given in."""

    objects: Tuple[ShapeObject, ...]

    def __post_init__(self):
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        positions = [obj.position for obj in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects at the same position: {', '.join(positions)}")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position))))

    @property
    def caption(self) -> str:
        return " and ".join(obj.caption for obj in self.objects)

    @property
    def held_out(self) -> bool:
        """Whether the scene contains a held-out (colour, shape) pair: an evaluation scene."""
        return any(obj.held_out for obj in self.objects)


def parse_caption(caption: str) -> Scene:
    """The scene of a caption in the form of `Scene.caption` (any object order); `ValueError` naming the problem."""
    objects = []
    for clause in caption.strip().split(" and "):
        words = clause.split()
        if len(words) != 7 or words[0] != "a" or words[3:5] != ["at", "the"]:
            expected = "expected 'a COLOUR SHAPE at the POSITION'"
            raise ValueError(f"cannot parse {clause!r} of caption {caption!r}: {expected}")
        try:
            objects.append(ShapeObject(words[1], words[2], " ".join(words[5:])))
        except ValueError as error:
            raise ValueError(f"{error} in caption {caption!r}") from None
    try:
        return Scene(tuple(objects))
    except ValueError as error:
        raise ValueError(f"{error} in caption {caption!r}") from None


# Sampling scenes.
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")


def _check_auxiliary_colours(split: str, auxiliary_colours: bool) -> None:
    if auxiliary_colours and split != "train":
        raise ValueError("auxiliary colours are for training data: no evaluation prompt asks for them")


def sample_scene(rng: np.random.Generator, split: str, auxiliary_colours: bool = False) -> Scene:
    """A random scene of `split`: 1 or 2 objects (equally likely) at random distinct positions.

    A "train" scene has no held-out pair; an "eval" scene has at least one (drawn uniformly among such scenes).
    `auxiliary_colours` ("train" only) draws colours from `AUXILIARY_COLOURS` too.
    """
    _check_split(split)
    _check_auxiliary_colours(split, auxiliary_colours)
    colours = _ALL_COLOUR_NAMES if auxiliary_colours else COLOUR_NAMES
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    while True:
        scene = Scene(tuple(
            ShapeObject(colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))], POSITIONS[p])
            for p in positions
        ))  # fmt: skip
        if scene.held_out == (split == "eval"):
            return scene


def evaluation_prompts(n: int, seed: int = 0, split: str = "eval") -> List[str]:
    """`n` distinct captions of `split`'s scenes, the same for the same `n`, `seed` and `split`: the held-out
    evaluation prompts, or (`split="train"`) prompts of the training distribution, to tell memorised from composed.

    There are 606 distinct evaluation captions (12 of one object, 594 of two) and 1410 training ones; `ValueError`
    for more.
    """
    _check_split(split)
    pairs, held_out = len(COLOURS) * len(SHAPES), len(HELD_OUT_PAIRS)
    seen = pairs - held_out
    if split == "eval":  # one object: a held-out pair at any position; two: any two pairs, less those with none
        distinct = held_out * len(POSITIONS) + math.comb(len(POSITIONS), 2) * (pairs**2 - seen**2)
    else:
        distinct = seen * len(POSITIONS) + math.comb(len(POSITIONS), 2) * seen**2
    if not 1 <= n <= distinct:
        raise ValueError(f"there are {distinct} distinct {split} prompts; asked for {n}")
    rng = np.random.default_rng(seed)
    prompts: Dict[str, None] = {}  # insertion-ordered set
    while len(prompts) < n:
        prompts[sample_scene(rng, split).caption] = None
    return list(prompts)


# Rendering and writing datasets.
def _check_side(size: int) -> None:
    if not MIN_SIDE <= size <= MAX_SIDE:
        raise ValueError(f"image side must be {MIN_SIDE} to {MAX_SIDE} pixels, got {size}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float, fill) -> None:
    half = extent / 2
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:  # an equilateral triangle pointing up, centred in its bounding box
        half_height = half * math.sqrt(3) / 2
        draw.polygon([(cx, cy - half_height), (cx - half, cy + half_height), (cx + half, cy + half_height)], fill=fill)


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """A `size` x `size` RGB image of `scene`: each object filled, its size and place within its quadrant random."""
    _check_side(size)
    side = size * SUPERSAMPLING
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = side / 2
    for obj in scene.objects:
        row, column = _CELLS[obj.position]
        extent = cell * rng.uniform(*EXTENT_RANGE)
        slack = (cell - extent) / 2 - CELL_MARGIN * cell  # how far the centre may move and keep the margin
        cx, cy = ((column + 0.5) * cell, (row + 0.5) * cell) + rng.uniform(-slack, slack, size=2)
        _draw_shape(draw, obj.shape, cx, cy, extent, _RENDERED_COLOURS[obj.colour])
    return image.reduce(SUPERSAMPLING)


def _remove_previous_dataset(folder: Path) -> None:
    """Delete the files a previous `metadata.jsonl` lists (inside `folder` only): stale images of a larger dataset
    would otherwise join the new one in an imagefolder loader."""
    if not (folder / METADATA_FILE).is_file():
        return
    root = folder.resolve()
    for file_name, _ in read_metadata(folder):
        path = (folder / file_name).resolve()
        if path.is_relative_to(root):
            path.unlink(missing_ok=True)


def write_dataset(
    folder: Union[str, Path], num_images: int, size: int = 64, seed: int = 0, split: str = "train",
    overwrite: bool = False, partial_caption_probability: float = 0.0, auxiliary_colours: bool = False,
) -> None:  # fmt: skip
    """Write `num_images` scenes of `split` as `000000.png`, ... plus `metadata.jsonl` (imagefolder layout).

    Refuses a non-empty `folder` (`FileExistsError`) unless `overwrite`, which first deletes the files that the
    folder's previous `metadata.jsonl` lists. Image `i` is the same for every `num_images` > `i` of one seed, and
    for every `partial_caption_probability` (see `partial_captions`, which it applies to the captions).
    `auxiliary_colours` ("train" only): see `sample_scene`.
    """
    _check_split(split)
    _check_auxiliary_colours(split, auxiliary_colours)
    _check_side(size)
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    _check_probability(partial_caption_probability)
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty; pass --overwrite to replace its files")
        _remove_previous_dataset(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(num_images):
        scene = sample_scene(rng, split, auxiliary_colours)
        file_name = f"{index:06d}.png"
        render_scene(scene, size, rng).save(folder / file_name)
        pairs.append((file_name, scene.caption))
    if partial_caption_probability:
        captions = partial_captions([caption for _, caption in pairs], partial_caption_probability, seed)
        pairs = [(file_name, caption) for (file_name, _), caption in zip(pairs, captions)]
    write_metadata(folder, pairs)


# Partial captions: a training augmentation.
# A caption that leaves out an object's colour or its shape is still true of its image; the hope was that the colour
# word alone would then decide the colour and the shape word the shape, as a held-out pair needs. Measured, it hurts
# (33.5% of held-out prompts against 69%, benchmarks/training/README.md): a caption naming only the shape teaches the
# shape word the colours it came with. A shape left out reads "shape" ("a green shape at the top left"), a colour
# left out is dropped ("a triangle at the top left").
UNNAMED_SHAPE = "shape"


def _check_probability(probability: float) -> None:
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"a probability must be in [0, 1], got {probability}")


def partial_captions(captions: Sequence[str], probability: float, seed: int = 0) -> List[str]:
    """`captions` (each in the form of `Scene.caption`) with each object's colour or shape, equally likely, left
    out with `probability`; the same for the same arguments."""
    _check_probability(probability)
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the scenes' and renderings' draws stay as they are
    rewritten = []
    for caption in captions:
        clauses = []
        for obj in parse_caption(caption).objects:
            colour, shape = obj.colour, obj.shape
            if rng.random() < probability:
                if rng.random() < 0.5:
                    colour = None
                else:
                    shape = UNNAMED_SHAPE
            clauses.append(" ".join(word for word in ("a", colour, shape, "at the", obj.position) if word))
        rewritten.append(" and ".join(clauses))
    return rewritten


# The evaluator.
@dataclass(frozen=True)
class DetectedObject:
    """An object found in an image; `colour` or `shape` is None when it is none of the vocabulary's."""

    colour: Optional[str]
    shape: Optional[str]
    position: str
    area: float  # fraction of the image
    triangle_score: float  # |c_3| / its ideal value: 1 for an equilateral triangle, 0 for a disk or a square
    square_score: float  # |c_4| / its ideal value: 1 for a square, 0 for a disk or an equilateral triangle
    elongation: float  # |c_2|: 0 for all three shapes

    @property
    def description(self) -> str:
        return f"a {self.colour or 'unknown-colour'} {self.shape or 'unknown-shape'} at the {self.position}"


@dataclass(frozen=True)
class ShapesJudgement:
    """How an image matches its caption.

    `correct` is the exact match: the same objects, each with its colour, shape and position, and nothing else.
    The attribute flags compare what was asked and what was found regardless of which object has what: the same
    multiset of colours (`colour`), of shapes (`shape`), the same set of positions (`position`), as many objects
    (`count`). They can all be true while `correct` is not: a red circle and a blue square drawn as a blue circle
    and a red square.
    """

    expected: Scene
    detected: Tuple[DetectedObject, ...]
    correct: bool
    colour: bool
    shape: bool
    position: bool
    count: bool

    @property
    def detected_description(self) -> str:
        return " and ".join(obj.description for obj in self.detected) or "nothing"


def _as_rgb(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
    """An H x W x 3 float array in [0, 1] of a PIL image or an H x W x 3 uint8 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError("expected a PIL image or an H x W x 3 uint8 array")
    return image.astype(np.float32) / 255


def _label_components(mask: np.ndarray) -> np.ndarray:
    """Labels of `mask`'s 4-connected components: each pixel gets its component's smallest flat index; `mask.size`
    off the mask. Vectorized: each round takes the neighbours' minimum, then jumps each label to its label's label
    (a label is always the index of a pixel of the same component). A convex blob takes under ten rounds at 256 px;
    a winding one at most as many as its length."""
    outside = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), outside)
    while True:
        smallest = labels.copy()
        np.minimum(smallest[1:], labels[:-1], out=smallest[1:])
        np.minimum(smallest[:-1], labels[1:], out=smallest[:-1])
        np.minimum(smallest[:, 1:], labels[:, :-1], out=smallest[:, 1:])
        np.minimum(smallest[:, :-1], labels[:, 1:], out=smallest[:, :-1])
        smallest[~mask] = outside
        smallest = np.append(smallest.ravel(), outside)[smallest].reshape(mask.shape)
        if np.array_equal(smallest, labels):
            return labels
        labels = smallest


def _colour_name(mean_rgb: np.ndarray) -> Optional[str]:
    hue, saturation, _ = colorsys.rgb_to_hsv(*mean_rgb)
    if saturation < WHITE_MAX_SATURATION:
        return "white"
    errors = {name: abs((360.0 * hue - palette_hue + 180.0) % 360.0 - 180.0) for name, palette_hue in _HUES.items()}
    name = min(errors, key=errors.get)
    return name if errors[name] <= MAX_HUE_ERROR else None


def _shape_name(triangle_score: float, square_score: float, elongation: float) -> Optional[str]:
    if elongation > MAX_ELONGATION:
        return None
    if max(triangle_score, square_score) < MIN_CORNER_SCORE:
        return "circle"
    return "triangle" if triangle_score > square_score else "square"


def _measure(rgb: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> DetectedObject:
    """The object of one connected component (its pixels' coordinates)."""
    height, width, _ = rgb.shape
    brightness = rgb[rows, columns].max(axis=1)
    inside = brightness >= EDGE_LEVEL * np.percentile(brightness, 90)
    rows, columns = rows[inside], columns[inside]
    area = len(rows)
    z = (columns + 0.5) + 1j * (rows + 0.5)  # pixel centres, y down
    centroid = z.mean()
    z = z - centroid

    def moment(k: int) -> float:
        return float(abs((z**k).sum()) / area ** (1 + k / 2))

    triangle_score, square_score, elongation = moment(3) / IDEAL_TRIANGLE_C3, moment(4) / IDEAL_SQUARE_C4, moment(2)
    return DetectedObject(
        colour=_colour_name(rgb[rows, columns].mean(axis=0)),
        shape=_shape_name(triangle_score, square_score, elongation),
        position=POSITIONS[2 * int(centroid.imag >= height / 2) + int(centroid.real >= width / 2)],
        area=area / (height * width),
        triangle_score=triangle_score,
        square_score=square_score,
        elongation=elongation,
    )


def detect_objects(image: Union[Image.Image, np.ndarray]) -> List[DetectedObject]:
    """The objects of an image in caption order (ties broken by size): each bright connected component that is not
    a speck, whatever its colour or shape."""
    rgb = _as_rgb(image)
    mask = rgb.max(axis=2) >= FOREGROUND_BRIGHTNESS
    labels = _label_components(mask)
    ids, counts = np.unique(labels[mask], return_counts=True)
    objects = [_measure(rgb, *np.nonzero(labels == label)) for label in ids[counts >= MIN_OBJECT_AREA * mask.size]]
    return sorted(objects, key=lambda obj: (POSITIONS.index(obj.position), -obj.area))


def judge_detection(detected: Sequence[DetectedObject], caption: Union[str, Scene]) -> ShapesJudgement:
    """Compare detected objects with a caption (or its parsed scene); see `ShapesJudgement`."""
    expected = parse_caption(caption) if isinstance(caption, str) else caption
    found = [(obj.colour, obj.shape, obj.position) for obj in detected]
    asked = [(obj.colour, obj.shape, obj.position) for obj in expected.objects]

    def same(attribute: int) -> bool:
        return Counter(triple[attribute] for triple in found) == Counter(triple[attribute] for triple in asked)

    return ShapesJudgement(
        expected, tuple(detected), correct=Counter(found) == Counter(asked), colour=same(0), shape=same(1),
        position=same(2), count=len(found) == len(asked),
    )  # fmt: skip


def judge_image(image: Union[Image.Image, np.ndarray], caption: Union[str, Scene]) -> ShapesJudgement:
    """Whether `image` shows exactly what `caption` asks, with per-attribute details; see `ShapesJudgement`."""
    return judge_detection(detect_objects(image), caption)


def evaluate_folder(folder: Union[str, Path]) -> Tuple[Dict[str, float], List[Dict]]:
    """Judge every image of an imagefolder against its caption in `metadata.jsonl`.

    Returns the summary (`images`, then the fractions of images that are `correct` and right in `colour`, `shape`,
    `position`, `count`) and one record per image (file name, caption, flags, what was detected).
    """
    records = read_metadata(folder)
    if not records:
        raise ValueError(f"{Path(folder) / METADATA_FILE} lists no images")
    per_image = []
    for file_name, text in records:
        try:
            expected = parse_caption(text)
        except ValueError as error:
            raise ValueError(f"{file_name}: {error}") from None
        with Image.open(Path(folder) / file_name) as image:
            judgement = judge_image(image, expected)
        flags = {key: getattr(judgement, key) for key in ("correct", "colour", "shape", "position", "count")}
        per_image.append({"file_name": file_name, "text": text, **flags, "detected": judgement.detected_description})
    summary = {"images": len(per_image)}
    for key in ("correct", "colour", "shape", "position", "count"):
        summary[key] = sum(record[key] for record in per_image) / len(per_image)
    return summary, per_image
