"""The coloured-shapes benchmark: exact captions, held-out pairs, and an analytic evaluator that must agree with the
renderer's ground truth (also on distorted images) and refuse wrong captions."""

import dataclasses
import io
import itertools
import json
from collections import Counter

import numpy as np
import pytest
from conftest import run_launcher
from PIL import Image, ImageDraw, ImageFilter

from diffusers_hart.cli.shapes import (
    build_eval_parser,
    build_make_parser,
    build_sample_parser,
    main_eval,
    main_make,
    main_sample,
)
from diffusers_hart.training.data import read_metadata
from diffusers_hart.training.shapes import (
    AUXILIARY_COLOURS,
    COLOUR_NAMES,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    Scene,
    ShapeObject,
    detect_objects,
    evaluation_prompts,
    judge_detection,
    judge_image,
    parse_caption,
    partial_captions,
    render_scene,
    sample_scene,
    write_dataset,
)

SCENES_PER_SPLIT = 150
MIN_ACCURACY = 0.99
# np.rot90 turns the image a quarter counter-clockwise: the top right quadrant becomes the top left, and so on.
QUARTER_TURN = {
    "top right": "top left", "top left": "bottom left", "bottom left": "bottom right", "bottom right": "top right"
}  # fmt: skip


def _all_scenes():
    objects = [ShapeObject(*triple) for triple in itertools.product(COLOUR_NAMES, SHAPES, POSITIONS)]
    singles = [Scene((obj,)) for obj in objects]
    pairs = [Scene((a, b)) for a, b in itertools.combinations(objects, 2) if a.position != b.position]
    return singles + pairs


@pytest.fixture(scope="module", params=[64, 128], ids=lambda size: f"{size}px")
def rendered(request):
    """(size, [(scene, H x W x 3 uint8 image)]): half train, half eval scenes."""
    size = request.param
    rng = np.random.default_rng(size)
    examples = []
    for split in ("train", "eval"):
        for _ in range(SCENES_PER_SPLIT):
            scene = sample_scene(rng, split)
            examples.append((scene, np.asarray(render_scene(scene, size, rng))))
    return size, examples


def _blur(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(size / 64)))


def _noise(image: np.ndarray, rng: np.random.Generator, std: float = 10.0) -> np.ndarray:
    return np.clip(image + rng.normal(0.0, std, image.shape), 0, 255).astype(np.uint8)


def _colour_drift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dimmer and tinted channels on a dark grey background, as a decoder might draw them."""
    drifted = image * rng.uniform(0.8, 1.0, size=3) + 20.0
    return np.clip(drifted, 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=60)
    return np.asarray(Image.open(buffer))


def _distorted(distortion: str, scene: Scene, image: np.ndarray, size: int, rng: np.random.Generator):
    """(scene, image) after `distortion`; only a rotation changes the scene."""
    if distortion == "quarter-turn":
        turned = Scene(tuple(ShapeObject(obj.colour, obj.shape, QUARTER_TURN[obj.position]) for obj in scene.objects))
        return turned, np.ascontiguousarray(np.rot90(image))
    images = {
        "clean": lambda: image,
        "noise": lambda: _noise(image, rng),
        "blur": lambda: _blur(image, size),
        "noise+blur": lambda: _noise(_blur(image, size), rng),
        "colour-drift+blur": lambda: _colour_drift(_blur(image, size), rng),
        "jpeg": lambda: _jpeg(image),
    }
    return scene, images[distortion]()


@pytest.mark.parametrize(
    "distortion", ["clean", "noise", "blur", "noise+blur", "colour-drift+blur", "jpeg", "quarter-turn"]
)
def test_evaluator_agrees_with_ground_truth(rendered, distortion):
    size, examples = rendered
    rng = np.random.default_rng(0)
    failures = []
    for scene, image in examples:
        scene, image = _distorted(distortion, scene, image, size, rng)
        judgement = judge_image(image, scene.caption)
        if not judgement.correct:
            failures.append(f"{scene.caption} -> {judgement.detected_description}")
    assert 1 - len(failures) / len(examples) >= MIN_ACCURACY, failures[:5]


def _corruptions(scene: Scene, rng: np.random.Generator):
    """{judgement flag that must be false: a wrong scene for `scene`'s image}."""
    objects = list(scene.objects)
    index = int(rng.integers(len(objects)))
    obj = objects[index]
    free = [position for position in POSITIONS if position not in {o.position for o in objects}]

    def replaced(**change):
        return Scene(tuple(objects[:index] + [dataclasses.replace(obj, **change)] + objects[index + 1 :]))

    corruptions = {
        "colour": replaced(colour=str(rng.choice([c for c in COLOUR_NAMES if c != obj.colour]))),
        "shape": replaced(shape=str(rng.choice([s for s in SHAPES if s != obj.shape]))),
        "position": replaced(position=str(rng.choice(free))),
    }
    if len(objects) == 2:
        corruptions["count"] = Scene((objects[1 - index],))  # an object dropped
        first, second = objects
        if first.colour != second.colour:  # the right colours on the wrong objects: only `correct` can tell
            corruptions["correct"] = Scene(
                (dataclasses.replace(first, colour=second.colour), dataclasses.replace(second, colour=first.colour))
            )
    else:
        extra = ShapeObject(str(rng.choice(COLOUR_NAMES)), str(rng.choice(SHAPES)), str(rng.choice(free)))
        corruptions["count"] = Scene((obj, extra))  # an object added
    return corruptions


def test_evaluator_rejects_wrong_captions(rendered):
    _, examples = rendered
    rng = np.random.default_rng(1)
    judged, accepted = Counter(), Counter()
    for scene, image in examples:
        detected = detect_objects(image)
        for flag, wrong_scene in _corruptions(scene, rng).items():
            judgement = judge_detection(detected, wrong_scene.caption)
            judged[flag] += 1
            # the exact match must fail, and so must the flag of the attribute that was changed
            accepted[flag] += judgement.correct or getattr(judgement, flag)
    assert set(judged) == {"colour", "shape", "position", "count", "correct"}
    for flag in judged:
        assert accepted[flag] / judged[flag] <= 1 - MIN_ACCURACY, (flag, accepted[flag], judged[flag])


def test_attribute_flags_of_a_partly_right_image():
    image = render_scene(parse_caption("a red circle at the top left"), 64, np.random.default_rng(0))
    judgement = judge_image(image, "a red square at the top right")
    assert (judgement.correct, judgement.colour, judgement.shape, judgement.position, judgement.count) == (
        False, True, False, False, True,
    )  # fmt: skip
    assert judgement.detected_description == "a red circle at the top left"


def test_blank_image_matches_no_caption():
    blank = np.zeros((64, 64, 3), np.uint8)
    assert detect_objects(blank) == []
    judgement = judge_image(blank, "a white square at the bottom right")
    assert not judgement.correct and not judgement.count and judgement.detected_description == "nothing"


def test_off_vocabulary_colours_and_shapes_are_not_guessed():
    image = Image.new("RGB", (128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle([8, 8, 48, 48], fill=(240, 130, 20))  # orange: hue 30, between red (0) and yellow (56)
    draw.ellipse([70, 10, 126, 38], fill=COLOURS["blue"])  # a 2:1 ellipse: no circle, square or triangle
    draw.rectangle([90, 100, 92, 102], fill=COLOURS["red"])  # a speck, not an object
    detected = detect_objects(image)
    assert [(obj.colour, obj.shape, obj.position) for obj in detected] == [
        (None, "square", "top left"), ("blue", None, "top right"),
    ]  # fmt: skip
    assert not judge_detection(detected, "a red square at the top left and a blue circle at the top right").correct


def test_image_types():
    scene = parse_caption("a purple triangle at the bottom left")
    image = render_scene(scene, 96, np.random.default_rng(0))
    assert judge_image(image, scene.caption).correct and judge_image(np.asarray(image), scene).correct
    assert judge_image(image.convert("RGBA"), scene).correct
    with pytest.raises(ValueError, match="uint8"):
        detect_objects(np.asarray(image, dtype=np.float32))


def test_caption_round_trip():
    scenes = _all_scenes()
    assert len({scene.caption for scene in scenes}) == len(scenes) == 6 * 3 * 4 + 6 * (6 * 3) ** 2
    for scene in scenes:
        assert parse_caption(scene.caption) == scene
        assert parse_caption(scene.caption).caption == scene.caption


def test_caption_lists_objects_in_reading_order():
    caption = "a blue square at the bottom right and a red circle at the top left"
    assert parse_caption(caption).caption == "a red circle at the top left and a blue square at the bottom right"


@pytest.mark.parametrize(
    "caption, problem",
    [
        ("a brown circle at the top left", "unknown colour 'brown'"),
        ("a red hexagon at the top left", "unknown shape 'hexagon'"),
        ("a red circle at the middle left", "unknown position 'middle left'"),
        ("a red circle in the top left", "expected 'a COLOUR SHAPE at the POSITION'"),
        ("a red circle at the top left and", "cannot parse 'a red circle at the top left and'"),
        ("a red circle at the top left and a blue square at the top left", "two objects at the same position"),
        (
            "a red circle at the top left and a red circle at the top right and a red circle at the bottom left",
            "1 to 2 objects, got 3",
        ),
    ],
)
def test_unparseable_caption_names_the_problem(caption, problem):
    with pytest.raises(ValueError, match=problem):
        parse_caption(caption)


def test_held_out_pairs_only_in_eval_scenes():
    rng = np.random.default_rng(0)
    train = [sample_scene(rng, "train") for _ in range(1000)]
    evaluation = [sample_scene(rng, "eval") for _ in range(1000)]
    train_pairs = {(obj.colour, obj.shape) for scene in train for obj in scene.objects}
    assert train_pairs == set(itertools.product(COLOUR_NAMES, SHAPES)) - HELD_OUT_PAIRS
    assert all(scene.held_out for scene in evaluation)
    assert HELD_OUT_PAIRS <= {(obj.colour, obj.shape) for scene in evaluation for obj in scene.objects}
    assert {len(scene.objects) for scene in train + evaluation} == {1, 2}
    with pytest.raises(ValueError, match="unknown split 'test'"):
        sample_scene(rng, "test")


def test_evaluation_prompts():
    prompts = evaluation_prompts(200, seed=3)
    assert len(set(prompts)) == 200 and all(parse_caption(prompt).held_out for prompt in prompts)
    assert prompts == evaluation_prompts(200, seed=3) and prompts != evaluation_prompts(200, seed=4)
    assert evaluation_prompts(20, seed=3) == prompts[:20]
    assert len(set(evaluation_prompts(606))) == sum(scene.held_out for scene in _all_scenes()) == 606
    with pytest.raises(ValueError, match="606 distinct"):
        evaluation_prompts(607)
    training_like = evaluation_prompts(1410, split="train")
    assert len(set(training_like)) == sum(not scene.held_out for scene in _all_scenes()) == 1410
    assert not any(parse_caption(prompt).held_out for prompt in training_like)
    with pytest.raises(ValueError, match="1410 distinct train prompts"):
        evaluation_prompts(1411, split="train")


def test_rendering_is_deterministic_from_the_seed():
    def images(seed):
        rng = np.random.default_rng(seed)
        return [np.asarray(render_scene(sample_scene(rng, "train"), 64, rng)) for _ in range(5)]

    first, again, other = images(7), images(7), images(8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_render_refuses_a_size_out_of_range():
    with pytest.raises(ValueError, match="64 to 256 pixels, got 32"):
        render_scene(parse_caption("a red circle at the top left"), 32, np.random.default_rng(0))


def test_dataset_folder_is_an_imagefolder_and_deterministic(tmp_path):
    write_dataset(tmp_path / "a", num_images=6, size=64, seed=2, split="eval")
    write_dataset(tmp_path / "b", num_images=6, size=64, seed=2, split="eval")
    lines = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == [f"{index:06d}.png" for index in range(6)]
    assert all(parse_caption(line["text"]).held_out for line in lines)
    for name in ["metadata.jsonl"] + [line["file_name"] for line in lines]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert Image.open(tmp_path / "a" / "000000.png").size == (64, 64)


def test_partial_captions_leave_out_one_attribute_and_keep_the_images(tmp_path):
    captions = evaluation_prompts(300, split="train")
    assert partial_captions(captions, 0.0) == captions
    everywhere = partial_captions(captions, 1.0, seed=4)
    assert everywhere == partial_captions(captions, 1.0, seed=4) != partial_captions(captions, 1.0, seed=5)
    left_out = Counter()
    for caption, partial in zip(captions, everywhere):
        for full, clause in zip(caption.split(" and "), partial.split(" and ")):
            _, colour, shape, position = full.split(" ", 3)
            # every object loses exactly one of the two, and keeps its position
            assert clause in (f"a {shape} {position}", f"a {colour} shape {position}"), (full, clause)
            left_out["colour" if clause.startswith(f"a {shape}") else "shape"] += 1
    assert 0.4 < left_out["colour"] / sum(left_out.values()) < 0.6
    some = partial_captions(captions, 0.3)
    changed = sum(full != partial for full, partial in zip(captions, some))
    assert 0.3 < changed / len(captions) < 0.6  # one or two objects, each left partial with probability 0.3

    write_dataset(tmp_path / "full", num_images=8, seed=3)
    main_make(["--output", str(tmp_path / "partial"), "--num-images", "8", "--seed", "3", "--partial-captions", "1"])
    full, partial = (read_metadata(tmp_path / name) for name in ("full", "partial"))
    assert [text for _, text in partial] == partial_captions([text for _, text in full], 1.0, seed=3)
    for file_name, _ in full:
        assert (tmp_path / "full" / file_name).read_bytes() == (tmp_path / "partial" / file_name).read_bytes()


def test_auxiliary_colours_come_with_every_shape_and_no_held_out_pair(tmp_path, capsys):
    rng = np.random.default_rng(0)
    objects = [obj for _ in range(400) for obj in sample_scene(rng, "train", auxiliary_colours=True).objects]
    pairs = Counter((obj.colour, obj.shape) for obj in objects)
    assert not set(pairs) & HELD_OUT_PAIRS
    assert {(colour, shape) for colour in AUXILIARY_COLOURS for shape in SHAPES} <= set(pairs)
    assert set(COLOUR_NAMES) <= {colour for colour, _ in pairs}  # the palette's colours stay
    with pytest.raises(ValueError, match="for training data"):
        sample_scene(rng, "eval", auxiliary_colours=True)
    folder = tmp_path / "aux"
    main_make(["--output", str(folder), "--num-images", "30", "--auxiliary-colours"])
    captions = [text for _, text in read_metadata(folder)]
    assert any(colour in caption for caption in captions for colour in AUXILIARY_COLOURS)
    assert "for training data" in _one_line_error(
        capsys, main_make, ["--output", str(tmp_path / "e"), "--split", "eval", "--auxiliary-colours"]
    )


def _one_line_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    return error


def test_make_then_eval_end_to_end(tmp_path, capsys):
    folder, report = tmp_path / "shapes", tmp_path / "out" / "scores.json"
    assert main_make(["--output", str(folder), "--num-images", "24", "--size", "64", "--seed", "5"]) == 0
    capsys.readouterr()
    assert main_eval([str(folder), "--output", str(report)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"images": 24, "correct": 1.0, "colour": 1.0, "shape": 1.0, "position": 1.0, "count": 1.0}
    written = json.loads(report.read_text())
    assert {key: written[key] for key in printed} == printed and len(written["per_image"]) == 24
    assert written["per_image"][0]["detected"] == written["per_image"][0]["text"]


def test_make_refuses_a_non_empty_folder_unless_overwrite(tmp_path, capsys):
    folder = tmp_path / "shapes"
    main_make(["--output", str(folder), "--num-images", "5"])
    error = _one_line_error(capsys, main_make, ["--output", str(folder), "--num-images", "2"])
    assert error.startswith("hart-make-shapes: error:") and "not empty; pass --overwrite" in error
    assert main_make(["--output", str(folder), "--num-images", "2", "--split", "eval", "--overwrite"]) == 0
    assert sorted(path.name for path in folder.iterdir()) == ["000000.png", "000001.png", "metadata.jsonl"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert f"missing {tmp_path / 'metadata.jsonl'}" in _one_line_error(capsys, main_eval, [str(tmp_path)])
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "a red blob at the top left"}\n')
    assert "x.png: unknown shape 'blob'" in _one_line_error(capsys, main_eval, [str(tmp_path)])
    (tmp_path / "metadata.jsonl").write_text("not json\n")
    assert "line 1" in _one_line_error(capsys, main_eval, [str(tmp_path)])
    assert "64 to 256 pixels" in _one_line_error(capsys, main_make, ["--output", str(tmp_path / "n"), "--size", "300"])
    assert "at least 1" in _one_line_error(capsys, main_make, ["--output", str(tmp_path / "n"), "--num-images", "0"])


@pytest.mark.parametrize("build_parser", [build_make_parser, build_eval_parser, build_sample_parser])
def test_every_argument_documents_its_default(build_parser):
    for action in build_parser()._actions:
        if action.dest != "help":
            assert "default" in action.help or "required" in action.help, action.dest


def test_sample_writes_judged_evaluation_images_independent_of_batch_size(tmp_path, capsys):
    """hart-sample-shapes on the tiny model: one image per evaluation prompt, seeded per image (so the batch size
    does not change its tokens; matmuls of another batch size round differently, by ~1e-5, which can move a uint8
    pixel by one level), an imagefolder that the evaluator judges, and the scores beside it."""
    common = ["--model", "tiny-random", "--num-prompts", "5", "--steps", "2", "--device", "cpu"]
    assert main_sample([*common, "--output", str(tmp_path / "a"), "--batch-size", "5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 5 and printed["processes"] == 1 and 0.0 <= printed["correct"] <= 1.0
    assert main_sample([*common, "--output", str(tmp_path / "b"), "--batch-size", "2"]) == 0
    lines = (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == evaluation_prompts(5)
    for line in lines:
        name = json.loads(line)["file_name"]
        a, b = (np.asarray(Image.open(tmp_path / run / name), dtype=np.int16) for run in ("a", "b"))
        assert np.abs(a - b).max() <= 1, name
    assert json.loads((tmp_path / "a" / "scores.json").read_text())["images"] == 5


def test_sample_splits_the_prompts_across_two_processes(tmp_path):
    """Two processes (torch.distributed.run, gloo on the CPU) share the prompts and write the folder that one process
    writes: each image seeded on its own, so equal up to a level of matmul rounding."""
    import os
    import sys

    common = ["--model", "tiny-random", "--num-prompts", "6", "--steps", "2", "--batch-size", "2", "--device", "cpu"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, "-m", "diffusers_hart.cli.shapes", "sample", *common, "--output", str(tmp_path / "two")]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = run_launcher(command, timeout=120, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "scores.json").read_text())["processes"] == 2
    assert main_sample([*common, "--output", str(tmp_path / "one")]) == 0
    for index in range(6):
        one, two = (np.asarray(Image.open(tmp_path / run / f"{index:06d}.png"), dtype=np.int16) for run in ("one", "two"))
        assert np.abs(one - two).max() <= 1
