"""`hart-train-transformer`: train or fine-tune the HART transformer on image-caption pairs.

    hart-train-transformer --pretrained_model_name_or_path hart-diffusers --train_data_dir pairs/ --output_dir out
    hart-train-transformer --text_encoder_path hart-diffusers --vae_path my-vae --transformer_config t.json ...
    accelerate launch -m diffusers_hart.cli.train_transformer --config transformer.yaml

Every flag can also come from `--config FILE.yaml|json` (keys named like the flags). Errors the user can fix are one
line on stderr with exit status 2; `--debug` shows their traceback.
"""

from ..training.train_transformer import main as train
from .parser import positive_int
from .training_arguments import build_training_parser, non_negative_float


def build_parser():
    parser = build_training_parser(
        prog="hart-train-transformer",
        description=__doc__,
        output_dir="hart-transformer",
        resolution_help="image side in pixels; must be the model's (default: the model's)",
        resolution_default=None,
    )
    # fmt: off
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", default=None,
                       help="HARTPipeline folder (or Hub id) to start from (default: none; or --text_encoder_path)")
    model.add_argument("--text_encoder_path", default=None,
                       help="folder with tokenizer/ and text_encoder/ subfolders, to build the pipeline from parts "
                       "with --vae_path and --transformer_config (default: none)")
    model.add_argument("--vae_path", default=None,
                       help="HARTAutoEncoder folder, e.g. hart-train-tokenizer's output; replaces the pipeline's "
                       "(default: none)")
    model.add_argument("--transformer_config", default=None,
                       help="JSON config of a fresh HARTTransformer2DModel; replaces the pipeline's (default: none)")
    model.add_argument("--system_prompt", default=None,
                       help="text before every caption (default: the pipeline's; empty when built from parts)")
    model.add_argument("--label_smoothing", type=non_negative_float, default=0.0,
                       help="label smoothing of the token cross-entropy (default: %(default)s)")
    model.add_argument("--original_cond_drop", action="store_true",
                       help="drop the text of ~54%% of the rows, as the original's randn < cond_drop_rate does, "
                       "instead of the transformer config's cond_drop_rate of them (default: off)")
    model.add_argument("--diffusion_loss_weight", type=non_negative_float, default=1.0,
                       help="weight of the residual-diffusion loss (default: %(default)s)")
    model.add_argument("--cache_text_context", default=None, metavar="DIR",
                       help="cache the frozen text encoder's output per caption in DIR, so later epochs skip it "
                       "(default: none, encode every time)")
    model.add_argument("--train_text_encoder", action="store_true",
                       help="train the text encoder with the transformer (float32 weights, saved with the pipeline) "
                       "instead of keeping it frozen (default: off)")
    model.add_argument("--text_encoder_learning_rate", type=float, default=None,
                       help="learning rate of the text encoder with --train_text_encoder (default: --learning_rate)")
    model.add_argument("--lora_rank", type=positive_int, default=None,
                       help="train a LoRA adapter of this rank instead of the whole transformer; needs peft "
                       "(default: none)")
    model.add_argument("--lora_alpha", type=positive_int, default=None, help="LoRA alpha (default: --lora_rank)")
    model.add_argument("--lora_target_modules", default="to_qkv,to_out,gate_proj,up_proj,down_proj",
                       help="comma-separated names of the Linear layers LoRA adapts (default: %(default)s)")
    model.add_argument("--validation_prompts", nargs="+", default=None,
                       help="prompts generated at each validation, saved under output_dir/validation/step-N "
                       "with a metadata.jsonl of their prompts (default: none)")
    model.add_argument("--validation_guidance_scale", type=float, default=4.5,
                       help="guidance scale of the validation images (default: %(default)s)")
    model.add_argument("--validation_save_pipeline", action="store_true",
                       help="also save the model as validated (the EMA weights with --use_ema) in "
                       "output_dir/validation/step-N/pipeline, to keep the step that validated best (default: off)")
    # fmt: on
    return parser


def main(argv=None) -> int:
    """Entry point of `hart-train-transformer`: returns 0, or exits with status 2 and a one-line error."""
    return build_parser().run(train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
