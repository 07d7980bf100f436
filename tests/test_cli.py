"""`hart-generate`: prompt to PNG in one command; errors the user can fix are one line and exit status 2."""

import os
import subprocess
import sys

import PIL.Image
import pytest
import torch

from diffusers_hart import HARTPipeline
from diffusers_hart.cli import generate
from diffusers_hart.cli.generate import build_parser, main
from diffusers_hart.pipelines.hart.tiny import tiny_random_pipeline

GENERATE = [sys.executable, "-m", "diffusers_hart.cli.generate"]
TOKENIZE_CAT = [
    sys.executable, "-c",
    "from diffusers_hart.pipelines.hart.tiny import byte_level_tokenizer; print(byte_level_tokenizer()('cat').input_ids)",
]  # fmt: skip
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _run_concurrently(*commands):
    """Run each command in a fresh process, all at once (each spends seconds importing torch); `CompletedProcess`es."""
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=OFFLINE)
        for command in commands
    ]
    outputs = [p.communicate() for p in processes]
    return [subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(processes, outputs)]


@pytest.fixture(scope="module")
def separate_processes(tmp_path_factory):
    """Two `hart-generate --seed 1` runs and two tokenizations of "cat", each in its own process: (pngs, results)."""
    folder = tmp_path_factory.mktemp("processes")
    pngs = [folder / "first.png", folder / "second.png"]
    generate_commands = [[*GENERATE, "a cat", "--seed", "1", "--device", "cpu", "--output", str(png)] for png in pngs]
    return pngs, _run_concurrently(*generate_commands, TOKENIZE_CAT, TOKENIZE_CAT)


def _error(capsys, argv) -> str:
    """stderr of `main(argv)`, which must exit with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_tiny_random_image(tmp_path):
    out = tmp_path / "nested" / "cat.png"
    assert main(["a cat", "--model", "tiny-random", "--output", str(out), "--seed", "1"]) == 0
    image = PIL.Image.open(out)
    assert image.size == tiny_random_pipeline().supported_size and image.mode == "RGB"


def test_several_images_make_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    argv = ["a cat", "--model", "tiny-random", "--output", str(out), "--num-images", "3", "--dtype", "fp32"]
    assert main([*argv, "--device", "cpu"]) == 0
    side = tiny_random_pipeline().supported_size[0]
    assert PIL.Image.open(out).size == (3 * side, side)


def test_converted_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_random_pipeline().save_pretrained(folder)
    out = tmp_path / "from_folder.png"
    assert main(["a dog", "--model", str(folder), "--output", str(out), "--no-more-smooth", "--steps", "4"]) == 0
    assert out.is_file()


def test_same_seed_gives_the_same_png_in_every_process(separate_processes):
    pngs, results = separate_processes
    assert all(result.returncode == 0 for result in results[:2]), [result.stderr for result in results[:2]]
    assert pngs[0].read_bytes() == pngs[1].read_bytes()


def test_tiny_tokenizer_ids_are_the_byte_values_in_every_process(separate_processes):
    first, second = separate_processes[1][2:]
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.strip() == str([3 + b for b in b"cat"])  # byte b after the 3 special tokens


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a cat", "--steps", "0"], "argument --steps: must be a whole number of at least 1, got '0'"),
        (["a cat", "--num-images", "0"], "argument --num-images: must be a whole number of at least 1, got '0'"),
        (["a cat", "--num-images", "two"], "argument --num-images: must be a whole number of at least 1, got 'two'"),
        (["a cat", "--device", "gpu"], "argument --device: Expected one of cpu, cuda"),
        (["a cat", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        ([], "the following arguments are required: prompt"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, message):
    lines = _error(capsys, argv).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hart-generate: error: {message}")


def test_cuda_without_cuda_is_refused_before_loading(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(generate, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    err = _error(capsys, ["a cat", "--device", "cuda"])
    assert err == "hart-generate: error: CUDA is not available on this machine; use --device cpu\n"


def test_cuda_device_index_beyond_the_machine_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(generate, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    err = _error(capsys, ["a cat", "--device", "cuda:1"])
    assert err == "hart-generate: error: --device cuda:1: this machine has 1 CUDA device(s)\n"


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("no such folder: ./converted"),
        OSError("someone/hart is not in the local Hugging Face cache and the Hub cannot be reached (offline)"),
        ValueError("a message\nover two lines"),
    ],
)
def test_loading_errors_are_one_line_and_debug_shows_them(capsys, monkeypatch, error):
    def from_pretrained(*args, **kwargs):
        raise error

    monkeypatch.setattr(HARTPipeline, "from_pretrained", from_pretrained)
    argv = ["a cat", "--model", "./converted"]
    assert _error(capsys, argv) == f"hart-generate: error: {' '.join(str(error).split())}\n"
    with pytest.raises(type(error)):
        main([*argv, "--debug"])


def test_pipeline_input_check_is_one_line(capsys):
    err = _error(capsys, ["a cat", "--guidance-scale", "-1", "--output", os.devnull])
    assert err.splitlines()[-1].startswith("hart-generate: error: `guidance_scale` must be")
    assert "Traceback" not in err


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_corrupt_weights_are_one_line(capsys, tmp_path, component):
    folder = tmp_path / "tiny"
    tiny_random_pipeline().save_pretrained(folder)
    (weights,) = (folder / component).glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    err = _error(capsys, ["a cat", "--model", str(folder), "--output", str(tmp_path / "out.png")])
    assert err.splitlines()[-1].startswith("hart-generate: error: ") and "Traceback" not in err
    if component == "transformer":  # diffusers names the file; transformers does not
        assert str(weights) in err


def test_missing_model_folder_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _error(capsys, ["a cat", "--model", "./missing"]) == "hart-generate: error: no such folder: ./missing\n"


def test_hub_id_not_in_the_offline_cache_is_one_line():
    """In a fresh process, where `HF_HUB_OFFLINE=1` takes effect; with the real loader."""
    (result,) = _run_concurrently([*GENERATE, "a cat", "--model", "someone/not-in-the-cache"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hart-generate: error: ") and "someone/not-in-the-cache" in lines[0]


def test_every_option_shows_its_default():
    options = [action for action in build_parser()._actions if action.option_strings and action.dest != "help"]
    assert options and all("(default: " in action.help for action in options), [a.dest for a in options]
