"""`hart-generate`: prompt to PNG in one command."""

import subprocess
import sys

import PIL.Image

from diffusers_hart.cli.generate import main
from diffusers_hart.pipelines.hart.tiny import tiny_random_pipeline


def test_tiny_random_image(tmp_path):
    out = tmp_path / "nested" / "cat.png"
    assert main(["a cat", "--output", str(out), "--seed", "1"]) == 0
    image = PIL.Image.open(out)
    assert image.size == tiny_random_pipeline().supported_size and image.mode == "RGB"


def test_several_images_make_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["a cat", "--output", str(out), "--num-images", "3", "--dtype", "fp32", "--device", "cpu"]) == 0
    side = tiny_random_pipeline().supported_size[0]
    assert PIL.Image.open(out).size == (3 * side, side)


def test_converted_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_random_pipeline().save_pretrained(folder)
    out = tmp_path / "from_folder.png"
    assert main(["a dog", "--model", str(folder), "--output", str(out), "--no-more-smooth", "--steps", "4"]) == 0
    assert out.is_file()


def test_console_script_is_installed_and_refuses_bad_counts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_hart.cli.generate", "a cat", "--num-images", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--num-images" in result.stderr
