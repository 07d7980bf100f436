"""`hart-train-tokenizer`: train the HART tokenizer (`HARTAutoEncoder`) on a folder of images.

    hart-train-tokenizer --vae_config vae.json --train_data_dir images/ --resolution 256 --output_dir my-vae
    accelerate launch -m diffusers_hart.cli.train_tokenizer --config tokenizer.yaml

Every flag can also come from `--config FILE.yaml|json` (keys named like the flags). Errors the user can fix are one
line on stderr with exit status 2; `--debug` shows their traceback.
"""

from ..training.train_tokenizer import main as train
from .parser import positive_int
from .training_arguments import build_training_parser, non_negative_float, non_negative_int


def build_parser():
    parser = build_training_parser(
        prog="hart-train-tokenizer",
        description=__doc__,
        output_dir="hart-tokenizer",
        resolution_help="image side in pixels: the tokenizer's last patch_num times its downsampling "
        "(default: %(default)s)",
        resolution_default=256,
    )
    # fmt: off
    model = parser.add_argument_group("tokenizer")
    model.add_argument("--pretrained_vae_path", default=None,
                       help="HARTAutoEncoder folder to continue training (default: none; or --vae_config)")
    model.add_argument("--vae_config", default=None,
                       help="JSON config of a HARTAutoEncoder to train from scratch (default: none)")
    model.add_argument("--vq_weight", type=non_negative_float, default=1.0,
                       help="weight of the VQ codebook + commitment loss (default: %(default)s)")
    model.add_argument("--discrete_weight", type=non_negative_float, default=1.0,
                       help="weight of the discrete-only decode's reconstruction loss (default: %(default)s)")
    model.add_argument("--discriminator_start_step", type=non_negative_int, default=None,
                       help="step from which a patch-GAN discriminator trains and its loss applies "
                       "(default: none, no discriminator)")
    model.add_argument("--discriminator_channels", type=positive_int, default=64,
                       help="width of the discriminator's first layer, doubled per layer (default: %(default)s)")
    model.add_argument("--discriminator_layers", type=positive_int, default=3,
                       help="strided layers of the discriminator; each halves the resolution (default: %(default)s)")
    model.add_argument("--discriminator_learning_rate", type=float, default=None,
                       help="the discriminator's learning rate (default: --learning_rate)")
    model.add_argument("--adversarial_weight", type=non_negative_float, default=0.1,
                       help="weight of the generator's hinge loss (default: %(default)s)")
    model.add_argument("--validation_images", default=None,
                       help="folder of held-out images for PSNR (default: none; or --num_validation_images)")
    model.add_argument("--num_validation_images", type=positive_int, default=None,
                       help="held-out images taken out of the training set for PSNR (default: none)")
    # fmt: on
    return parser


def main(argv=None) -> int:
    """Entry point of `hart-train-tokenizer`: returns 0, or exits with status 2 and a one-line error."""
    return build_parser().run(train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
