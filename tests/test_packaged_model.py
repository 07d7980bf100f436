"""The shapes model shipped in the package: `hart-generate`'s default, loaded offline, drawing what it is asked."""

import PIL.Image
import pytest
import torch

from diffusers_hart import HARTPipeline
from diffusers_hart.cli.generate import main
from diffusers_hart.pretrained import SHAPES, packaged_model_path
from diffusers_hart.training.shapes import evaluation_prompts, judge_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes_pipeline():
    pipe = HARTPipeline.from_pretrained(packaged_model_path(SHAPES), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_hart_generate_uses_it_by_default(tmp_path):
    out = tmp_path / "shapes.png"
    assert main(["a red circle at the top left", "--output", str(out), "--num-images", "2", "--device", "cpu"]) == 0
    assert PIL.Image.open(out).size == (2 * 64, 64)


def test_it_fits_the_size_budget():
    """The issue's budget for a model that ships inside the package: 30 MB, text encoder included."""
    size = sum(f.stat().st_size for f in packaged_model_path(SHAPES).rglob("*") if f.is_file())
    assert size <= 30e6, size


def test_it_draws_what_training_like_prompts_ask(shapes_pipeline):
    """Prompts of the training distribution (no held-out colour-shape pair), judged by the analytic evaluator: at
    least 80% fully correct, the bar the training issue sets (the held-out prompts' score, 88.5% of 200 on the CPU,
    is recorded in benchmarks/training/README.md: twenty prompts are too few to assert it)."""
    prompts = evaluation_prompts(20, seed=2026, split="train")
    images = shapes_pipeline(prompts, generator=torch.Generator().manual_seed(0)).images
    correct = [judge_image(image, prompt).correct for image, prompt in zip(images, prompts)]
    assert sum(correct) >= 16, [p for p, ok in zip(prompts, correct) if not ok]


def test_unknown_packaged_name_is_refused():
    with pytest.raises(ValueError, match="no packaged model 'cats'; the package ships shapes"):
        packaged_model_path("cats")
