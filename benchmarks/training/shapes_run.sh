#!/usr/bin/env bash
# The shapes model end to end on one GPU: data, tokenizer, transformer, 200 held-out prompts generated and judged.
# This is the command the device run of benchmarks/training/README.md used; SMOKE=1 shrinks every number so that the
# same steps run on a CPU in about two minutes (a check of the script, not of the model).
#
#   OUT=shapes-out bash benchmarks/training/shapes_run.sh
#
# Writes under $OUT: the trained pipeline (float16 weights) as shapes-model.tar.part-* (split below 16 MB each) and
# shapes-logs.tar (both trainings' logs/ with losses.jsonl and run_summary.json, and validation_scores.jsonl), as soon
# as training ends; then adds scores.json of the held-out prompts to the tar, samples.png (a grid of them), and, when
# this call trained the tokenizer, tokenizer_roundtrip.json.
#
# The defaults are the packaged model's recipe: 32 shards of training scenes plus 32 shards whose colours also include
# the auxiliary ones, each with every shape (AUX_SHARDS made, AUXILIARY_SHARDS trained on; 0 trains on the palette
# alone), the text encoder trained with the transformer, the tokenizer trained on images of every pair.
#
# VALIDATION_PROMPTS=<n> (default 100) held-out prompts, disjoint from the scored ones (evaluation_prompts' next n),
# are generated with the EMA weights every VALIDATION_STEPS (250) steps and judged: validation_scores.jsonl is the
# held-out score along the training. Each validation also saves the model it judged, and the model shipped and
# scored is the one of the validation that scored best (SELECT_BY_VALIDATION=1, the default; ties go to the later
# step): the 100 prompts choose the step, the scored 200 never do. eval-final/scores.json in the logs tar scores the
# last step's model for comparison.
#
# PARTIAL_CAPTIONS=<p> trains on captions that leave out each object's colour or shape with probability p
# (shapes.partial_captions); TRANSFORMER_CONFIG_OVERRIDES='{"key": value}' changes the transformer's config.
#
# DATA_ONLY=1 makes the data in $WORK and stops; DATA_FROM=<folder> links that data (an earlier $WORK's train/,
# train-aux/, codec/ and base/) instead of making it, so that variants side by side make it once.
#
# BUDGET=<seconds> fits the whole script in that time: the transformer trains until BUDGET - RESERVE seconds after
# the start. RESUME=1 keeps $WORK's data and tokenizer and resumes the transformer from its latest checkpoint (a
# time-limited training stops with a checkpoint), to train longer in a second call on the same machine; it stops
# with an error where $WORK holds no earlier run (a device call that landed on a fresh machine).
set -euo pipefail
OUT=${OUT:-shapes-out}
WORK=${WORK:-/tmp/hart-shapes}
if [ "${SMOKE:-0}" = 1 ]; then
    SHARDS=2 CODEC_EVAL_SHARDS=1 IMAGES_PER_SHARD=40 TOKENIZER_STEPS=4 TRANSFORMER_STEPS=4 BATCH=8 TRANSFORMER_BATCH=8 PRECISION=no WORKERS=0
    EVAL_PROMPTS=4 VALIDATION_PROMPTS=3 VALIDATION_STEPS=2 AUX_SHARDS=1
fi
SHARDS=${SHARDS:-32}
IMAGES_PER_SHARD=${IMAGES_PER_SHARD:-1500}
# The tokenizer is an image codec and reads no captions: it also trains on this many shards of the held-out
# colour-shape pairs (0 reproduces the first run's tokenizer, which never saw them and reconstructs them badly:
# tokenizer_roundtrip.py). Only the transformer's caption-image pairs exclude the held-out pairs.
CODEC_EVAL_SHARDS=${CODEC_EVAL_SHARDS:-2}
TOKENIZER_STEPS=${TOKENIZER_STEPS:-20000}
TRANSFORMER_STEPS=${TRANSFORMER_STEPS:-20000}
# wall-clock limits: a device call lasts at most 10 minutes, and the step rate was not known beforehand
TOKENIZER_SECONDS=${TOKENIZER_SECONDS:-75}
TRANSFORMER_SECONDS=${TRANSFORMER_SECONDS:-190}
BATCH=${BATCH:-128}
TRANSFORMER_BATCH=${TRANSFORMER_BATCH:-256}
PRECISION=${PRECISION:-bf16}
WORKERS=${WORKERS:-6}
EVAL_PROMPTS=${EVAL_PROMPTS:-200}
RESUME=${RESUME:-0}
# TEXT_ENCODER=per-word writes the text encoder with zeroed attention outputs (shapes_model.shapes_text_encoder)
TEXT_ENCODER=${TEXT_ENCODER:-contextual}
# TRAIN_TEXT_ENCODER=1 (the packaged model's recipe) trains the text encoder with the transformer
# (--train_text_encoder); 0 keeps it frozen and caches its context
TRAIN_TEXT_ENCODER=${TRAIN_TEXT_ENCODER:-1}
# TOKENIZER_FROM=<folder> reuses a trained tokenizer (a HARTAutoEncoder folder) instead of training one
TOKENIZER_FROM=${TOKENIZER_FROM:-}
RESERVE=${RESERVE:-100}
VALIDATION_PROMPTS=${VALIDATION_PROMPTS:-100}
VALIDATION_STEPS=${VALIDATION_STEPS:-250}
# the transformer's --label_smoothing and --adam_weight_decay, and the trained text encoder's learning rate
LABEL_SMOOTHING=${LABEL_SMOOTHING:-0}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.01}
TEXT_ENCODER_LEARNING_RATE=${TEXT_ENCODER_LEARNING_RATE:-6e-4}
DATA_FROM=${DATA_FROM:-}
PARTIAL_CAPTIONS=${PARTIAL_CAPTIONS:-0}
# AUX_SHARDS=<n> makes n more training shards whose colours include shapes.AUXILIARY_COLOURS; AUXILIARY_SHARDS=<m>
# trains on the first m of them besides the palette's shards
AUX_SHARDS=${AUX_SHARDS:-32}
AUXILIARY_SHARDS=${AUXILIARY_SHARDS:-$AUX_SHARDS}
TRANSFORMER_CONFIG_OVERRIDES=${TRANSFORMER_CONFIG_OVERRIDES:-"{}"}
SELECT_BY_VALIDATION=${SELECT_BY_VALIDATION:-1}
mkdir -p "$OUT" "$WORK"
START=$(date +%s)
stamp() { echo "[$(date +%T)] $*"; }
PYTHON=${PYTHON:-python3}

common=(--resolution 64 --mixed_precision "$PRECISION"
        --dataloader_num_workers "$WORKERS" --report_to none --checkpointing_steps 1000000 --lr_scheduler constant_with_warmup)

merge_shards() {  # one metadata.jsonl for the shard folders directly under $1; $2: shapes.partial_captions' probability
"$PYTHON" - "$1" "${2:-0}" <<'EOF'
import sys
from pathlib import Path
from diffusers_hart.training.data import read_metadata, write_metadata
from diffusers_hart.training.shapes import partial_captions
root = Path(sys.argv[1])
pairs = [(f"{shard.name}/{name}", text) for shard in sorted(root.glob("*shard-*")) for name, text in read_metadata(shard)]
if float(sys.argv[2]):
    pairs = list(zip([name for name, _ in pairs], partial_captions([text for _, text in pairs], float(sys.argv[2]))))
write_metadata(root, pairs)
print(f"{root}: {len(pairs)} images")
EOF
}

make_data() {
stamp "data: $SHARDS shards of $IMAGES_PER_SHARD training images, $AUX_SHARDS with auxiliary colours too and" \
    "$CODEC_EVAL_SHARDS of held-out-pair images for the tokenizer"
# one process that forks a worker per CPU: a process per shard would each import the package
"$PYTHON" - "$WORK" "$IMAGES_PER_SHARD" "$SHARDS" "$AUX_SHARDS" "$CODEC_EVAL_SHARDS" <<'EOF'
import sys
from multiprocessing import Pool
from diffusers_hart.training.shapes import write_dataset
work, per_shard, (shards, aux_shards, codec_shards) = sys.argv[1], int(sys.argv[2]), map(int, sys.argv[3:])
jobs = [(f"{work}/train/shard-{i}", per_shard, 64, i, "train", True) for i in range(shards)]
jobs += [
    (f"{work}/train-aux/aux-shard-{i}", per_shard, 64, 2000 + i, "train", True, 0.0, True) for i in range(aux_shards)
]
jobs += [(f"{work}/codec/eval-shard-{i}", per_shard, 64, 1000 + i, "eval", True) for i in range(codec_shards)]
with Pool() as pool:
    pool.starmap(write_dataset, jobs)
EOF
mkdir -p "$WORK/codec"
for shard in "$WORK"/train/shard-*; do
    ln -sfn "../train/$(basename "$shard")" "$WORK/codec/$(basename "$shard")"
done
merge_shards "$WORK/train"
merge_shards "$WORK/codec"
base_flags=()
[ "$TEXT_ENCODER" = per-word ] && base_flags=(--per-word-text-encoder)
"$PYTHON" -m diffusers_hart.training.shapes_model --output "$WORK/base" "${base_flags[@]}"
}

TOKENIZER_TRAINED=0
train_tokenizer() {
TOKENIZER_TRAINED=1
stamp "tokenizer: $TOKENIZER_STEPS steps"
rm -rf "$WORK/tokenizer"
"$PYTHON" -m diffusers_hart.cli.train_tokenizer "${common[@]}" --train_data_dir "$WORK/codec" --output_dir "$WORK/tokenizer" --train_batch_size "$BATCH" \
    --vae_config "$WORK/base/vae_config.json" --max_train_steps "$TOKENIZER_STEPS" --max_train_seconds "$TOKENIZER_SECONDS" \
    --learning_rate 4e-4 --lr_warmup_steps 50 --num_validation_images 64 --validation_steps 1000000
}

resume=()
if [ "$RESUME" = 1 ]; then
    # a device call may land on a fresh machine: starting over there would spend the call retraining from nothing
    if [ ! -f "$WORK/tokenizer/diffusion_pytorch_model.safetensors" ] || [ ! -d "$WORK/transformer" ]; then
        echo "RESUME=1 but $WORK holds no earlier run (tokenizer/ and transformer/): nothing to resume" >&2
        exit 2
    fi
    stamp "resuming: data and tokenizer kept from the previous run"
    resume=(--resume_from_checkpoint latest)
else
    rm -rf "$WORK/transformer"
    if [ -n "$DATA_FROM" ]; then
        stamp "data: linked from $DATA_FROM"
        for part in train train-aux codec base; do
            [ -e "$DATA_FROM/$part" ] || continue
            rm -rf "${WORK:?}/$part" && ln -s "$(realpath "$DATA_FROM/$part")" "$WORK/$part"
        done
    else
        make_data
    fi
    if [ "${DATA_ONLY:-0}" = 1 ]; then
        exit 0
    fi
    if [ -n "$TOKENIZER_FROM" ]; then
        stamp "tokenizer: reused from $TOKENIZER_FROM"
        rm -rf "$WORK/tokenizer" && cp -r "$TOKENIZER_FROM" "$WORK/tokenizer" && mkdir -p "$WORK/tokenizer/logs"
    else
        train_tokenizer
    fi
fi
if [ -n "${BUDGET:-}" ]; then
    TRANSFORMER_SECONDS=$(( BUDGET - RESERVE - ($(date +%s) - START) ))
fi
# this run's training set (captions, auxiliary shards) and transformer config, beside data that variants may share
train_dir="$WORK/train"
if [ "$PARTIAL_CAPTIONS" != 0 ] || [ "$AUXILIARY_SHARDS" -gt 0 ]; then
    train_dir="$WORK/train-this-run"
    stamp "training set: $AUXILIARY_SHARDS shards with auxiliary colours added, partial captions $PARTIAL_CAPTIONS"
    rm -rf "$train_dir" && mkdir -p "$train_dir"
    for shard in "$WORK"/train/shard-* $(seq -f "$WORK/train-aux/aux-shard-%g" 0 $((AUXILIARY_SHARDS - 1))); do
        if [ ! -d "$shard" ]; then
            echo "missing $shard: make the data with AUX_SHARDS=$AUXILIARY_SHARDS or more" >&2
            exit 2
        fi
        ln -s "$(realpath "$shard")" "$train_dir/$(basename "$shard")"
    done
    merge_shards "$train_dir" "$PARTIAL_CAPTIONS"
fi
"$PYTHON" - "$WORK/base/transformer_config.json" "$TRANSFORMER_CONFIG_OVERRIDES" "$WORK/transformer_config.json" <<'EOF'
import json, sys
from pathlib import Path
config = {**json.loads(Path(sys.argv[1]).read_text()), **json.loads(sys.argv[2])}
Path(sys.argv[3]).write_text(json.dumps(config, indent=2) + "\n")
EOF
text_flags=(--cache_text_context "$WORK/context")
if [ "$TRAIN_TEXT_ENCODER" = 1 ]; then
    text_flags=(--train_text_encoder --text_encoder_learning_rate "$TEXT_ENCODER_LEARNING_RATE")
fi
validation_flags=(--validation_steps 1000000)
if [ "$VALIDATION_PROMPTS" -gt 0 ]; then
    mapfile -t validation_prompts < <("$PYTHON" -c "from diffusers_hart.training.shapes import evaluation_prompts as p
print('\n'.join(p($EVAL_PROMPTS + $VALIDATION_PROMPTS)[$EVAL_PROMPTS:]))")
    validation_flags=(--validation_steps "$VALIDATION_STEPS" --validation_save_pipeline
                      --validation_prompts "${validation_prompts[@]}")
fi
stamp "transformer: $TRANSFORMER_STEPS steps or $TRANSFORMER_SECONDS s ${resume[*]}"
"$PYTHON" -m diffusers_hart.cli.train_transformer "${common[@]}" --train_data_dir "$train_dir" \
    --output_dir "$WORK/transformer" \
    --train_batch_size "$TRANSFORMER_BATCH" \
    --text_encoder_path "$WORK/base" --vae_path "$WORK/tokenizer" \
    --transformer_config "$WORK/transformer_config.json" --system_prompt "$("$PYTHON" -c 'from diffusers_hart.training.shapes_model import SYSTEM_PROMPT; print(SYSTEM_PROMPT, end="")')" \
    --max_train_steps "$TRANSFORMER_STEPS" --max_train_seconds "$TRANSFORMER_SECONDS" --learning_rate 6e-4 \
    --lr_warmup_steps 100 --label_smoothing "$LABEL_SMOOTHING" --adam_weight_decay "$WEIGHT_DECAY" \
    --use_ema --ema_decay 0.999 "${text_flags[@]}" "${validation_flags[@]}" "${resume[@]}"
if [ "$VALIDATION_PROMPTS" -gt 0 ]; then
    stamp "held-out score of every validation"
    "$PYTHON" - "$WORK/transformer" <<'EOF'
import json, sys
from pathlib import Path
from diffusers_hart.training.shapes import evaluate_folder
output = Path(sys.argv[1])
steps = sorted(int(folder.name.split("-")[1]) for folder in (output / "validation").glob("step-*"))
with open(output / "logs" / "validation_scores.jsonl", "w") as log:
    for step in steps:  # each folder is an imagefolder: its images and their prompts
        summary, _ = evaluate_folder(output / "validation" / f"step-{step}")
        log.write(json.dumps({"step": step, **summary}) + "\n")
        print(f"step {step}", summary)
EOF
fi
shipped_from="$WORK/transformer"
if [ "$VALIDATION_PROMPTS" -gt 0 ] && [ "$SELECT_BY_VALIDATION" = 1 ]; then
    best_step=$("$PYTHON" -c "import json, sys
scores = [json.loads(line) for line in open(sys.argv[1])]
print(max(scores, key=lambda score: (score['correct'], score['step']))['step'])" \
        "$WORK/transformer/logs/validation_scores.jsonl")
    echo "$best_step" > "$WORK/transformer/logs/selected_step.txt"
    shipped_from="$WORK/transformer/validation/step-$best_step/pipeline"
fi
stamp "the shipped form of $shipped_from: float16 weights (the CLI upcasts them on the CPU), evaluated as shipped"
to_float16() {
"$PYTHON" - "$1" "$2" <<'EOF'
import sys, torch
from diffusers_hart import HARTPipeline
HARTPipeline.from_pretrained(sys.argv[1]).to(torch.float16).save_pretrained(sys.argv[2])
EOF
}
rm -rf "$WORK/shipped" && to_float16 "$shipped_from" "$WORK/shipped"
# the model and the training logs go to $OUT first, so that a call cut short in the evaluation still returns them
(cd "$WORK/shipped" && tar -cf - .) | split -b 15m - "$OUT/shapes-model.tar.part-"
tar -cf "$OUT/shapes-logs.tar" -C "$WORK" tokenizer/logs transformer/logs
judge_held_out() {  # the model folder $1 generates the held-out prompts into $WORK/$2, whose scores.json joins the tar
rm -rf "${WORK:?}/$2"
"$PYTHON" -m diffusers_hart.cli.shapes sample --model "$1" --output "$WORK/$2" \
    --num-prompts "$EVAL_PROMPTS" --batch-size 100 --dtype fp32
tar -rf "$OUT/shapes-logs.tar" -C "$WORK" "$2/scores.json"
}
stamp "evaluation: $EVAL_PROMPTS held-out prompts"
judge_held_out "$WORK/shipped" eval
if [ "$shipped_from" != "$WORK/transformer" ]; then
    stamp "evaluation of the last step's model, for comparison"
    rm -rf "$WORK/final" && to_float16 "$WORK/transformer" "$WORK/final"
    judge_held_out "$WORK/final" eval-final
fi
"$PYTHON" - "$WORK/eval" "$OUT/samples.png" <<'EOF'
import sys
from pathlib import Path
from diffusers.utils import make_image_grid
from PIL import Image
from diffusers_hart.training.data import read_metadata
folder = Path(sys.argv[1])
images = [Image.open(folder / name).convert("RGB") for name, _ in read_metadata(folder)[:32]]
images += [Image.new("RGB", images[0].size)] * (-len(images) % 8)
make_image_grid(images, rows=len(images) // 8, cols=8).save(sys.argv[2])
EOF
if [ "$TOKENIZER_TRAINED" = 1 ]; then  # a kept or reused tokenizer was judged when it was trained
    stamp "tokenizer roundtrip"
    "$PYTHON" benchmarks/training/tokenizer_roundtrip.py "$WORK/tokenizer" --num-images "$EVAL_PROMPTS" \
        --output "$WORK/eval/tokenizer_roundtrip.json"
    tar -rf "$OUT/shapes-logs.tar" -C "$WORK" eval/tokenizer_roundtrip.json
fi
stamp "done"
