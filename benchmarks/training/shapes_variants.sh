#!/usr/bin/env bash
# Variants of the shapes model trained side by side on one GPU, in one device call, so that their scores compare
# under the same time, tokenizer and machine. Each variant is `name:VAR=value,VAR=value` of shapes_run.sh's settings
# and runs shapes_run.sh with its own work folder; all start together and share the GPU and the CPUs.
#
#   VARIANTS="frozen:TRAIN_TEXT_ENCODER=0 joint:TRAIN_TEXT_ENCODER=1" \
#       TOKENIZER_FROM=diffusers_hart/pretrained/shapes/vae BUDGET=540 OUT=$OUT bash benchmarks/training/shapes_variants.sh
#
# Under $OUT: variants.tar (each variant's shapes.log, shapes-logs.tar and samples.png), summary.txt (each one's
# held-out scores), and the model parts of the variant whose best validation scored highest (a device call returns
# at most 8 files): the validation prompts choose the model, the scored held-out prompts never do.
set -u
OUT=${OUT:-shapes-variants-out}
VARIANTS=${VARIANTS:-"frozen:TRAIN_TEXT_ENCODER=0 joint:TRAIN_TEXT_ENCODER=1"}
export TOKENIZER_FROM=${TOKENIZER_FROM:-} BUDGET=${BUDGET:-540} WORKERS=${WORKERS:-3} PYTHON=${PYTHON:-python3}
mkdir -p "$OUT/variants"
for variant in $VARIANTS; do
    name=${variant%%:*}
    settings=${variant#*:}
    mkdir -p "$OUT/variants/$name"
    (
        IFS=, && for setting in $settings; do export "${setting?}"; done
        OUT="$OUT/variants/$name" WORK="/tmp/hart-shapes-$name" bash benchmarks/training/shapes_run.sh 2>&1 \
            | tr '\r' '\n' | grep -v -E "it/s(, [^]]*)?\]$" > "$OUT/variants/$name/shapes.log"
    ) &
done
wait
best="" best_score=-1
for variant in $VARIANTS; do
    name=${variant%%:*}
    # prints the summary line; its last word is the score that chooses (the best validation, else the scored one)
    line=$("$PYTHON" - "$OUT/variants/$name/shapes-logs.tar" <<'EOF' 2>/dev/null || echo "no scores: none"
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as logs:
    def read(name):
        try:
            return logs.extractfile(name).read().decode()
        except KeyError:
            return None
    shipped, final = (json.loads(read(name) or "null") for name in ("eval/scores.json", "eval-final/scores.json"))
    validations = [json.loads(line) for line in (read("transformer/logs/validation_scores.jsonl") or "").splitlines()]
    selected = read("transformer/logs/selected_step.txt")
words = [f"held-out fully right {shipped['correct']}"]
choice = shipped["correct"]
if selected:
    choice = next(v["correct"] for v in validations if v["step"] == int(selected))
    words += [f"(step {selected.strip()}, its validation {choice})", f"last step's model {final and final['correct']}"]
print(", ".join(words), "; chosen by", choice)
EOF
)
    score=${line##* }
    echo "$name ($variant): $line" | tee -a "$OUT/summary.txt"
    if [ "$score" != none ] && "$PYTHON" -c "import sys; sys.exit(not $score > $best_score)"; then
        best=$name best_score=$score
    fi
done
echo "best: ${best:-none}" | tee -a "$OUT/summary.txt"
[ -n "$best" ] && mv "$OUT/variants/$best"/shapes-model.tar.part-* "$OUT/"
rm -f "$OUT"/variants/*/shapes-model.tar.part-*
tar -cf "$OUT/variants.tar" -C "$OUT" variants && rm -rf "$OUT/variants"
