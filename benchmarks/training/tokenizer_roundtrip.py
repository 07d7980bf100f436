"""Can a shapes tokenizer reproduce what generation asks of it? Judge its reconstructions of both splits.

Renders scenes of the `train` split (colour-shape pairs the tokenizer trained on) and of the `eval` split (each with
a held-out pair), encodes and decodes them through the continuous latent and through the discrete tokens alone, and
judges every reconstruction with the analytic evaluator. Generation cannot score better on held-out prompts than
the tokenizer reconstructs held-out images.

    python benchmarks/training/tokenizer_roundtrip.py diffusers_hart/pretrained/shapes/vae --output roundtrip.json
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from diffusers_hart import HARTAutoEncoder
from diffusers_hart.training.data import ImageTextFolder, collate_image_text, tensor_to_image
from diffusers_hart.training.shapes import SPLITS, judge_image, write_dataset
from diffusers_hart.training.tokenizer_step import inference_reconstructions

KEYS = ("correct", "colour", "shape", "position", "count")


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vae", help="HARTAutoEncoder folder")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", default=None, help="JSON file for the scores")
    args = parser.parse_args(argv)
    vae = HARTAutoEncoder.from_pretrained(args.vae).float().eval()
    scores = {"vae": args.vae, "num_images": args.num_images}
    with tempfile.TemporaryDirectory() as scratch:
        for split in SPLITS:
            folder = Path(scratch, split)
            write_dataset(folder, args.num_images, args.size, args.seed, split)
            batch = collate_image_text(list(ImageTextFolder(folder, args.size)))
            continuous, discrete = inference_reconstructions(vae, batch["pixel_values"])
            for kind, images in (("continuous", continuous), ("discrete", discrete)):
                pairs = zip(images, batch["texts"])
                judged = [judge_image(tensor_to_image(image[None]), text) for image, text in pairs]
                scores[f"{split}/{kind}"] = {key: float(np.mean([getattr(j, key) for j in judged])) for key in KEYS}
                print(split, kind, scores[f"{split}/{kind}"])
    if args.output:
        Path(args.output).write_text(json.dumps(scores, indent=2) + "\n")


if __name__ == "__main__":
    main()
