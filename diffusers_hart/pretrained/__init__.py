"""Models that ship inside the package and load offline by name (`hart-generate --model shapes`).

`shapes` is the small HART trained on the shapes benchmark (`diffusers_hart.training.shapes`): 64 px images of one
or two coloured shapes in the quadrants of the image, drawn from captions such as "a red circle at the top left and
a blue square at the bottom right". Its transformer trained on one GPU (`benchmarks/training/shapes_run.sh`); its
tokenizer is that run's, fine-tuned on images of every colour-shape pair. Its float16 weights (21 MB: tokenizer,
transformer and a frozen two-layer text encoder) are loaded in the dtype asked for. `benchmarks/training/README.md`
gives its scores and how it was trained.
"""

from pathlib import Path
from typing import Dict

SHAPES = "shapes"
PACKAGED_MODELS: Dict[str, Path] = {SHAPES: Path(__file__).parent / SHAPES}


def packaged_model_path(name: str) -> Path:
    """The folder of the packaged model `name` (a `HARTPipeline.from_pretrained` folder)."""
    if name not in PACKAGED_MODELS:
        raise ValueError(f"no packaged model {name!r}; the package ships {', '.join(sorted(PACKAGED_MODELS))}")
    return PACKAGED_MODELS[name]
