"""Loss curves of one or more training runs (their `logs/losses.jsonl`) in one PNG, e.g. 1 GPU against 2.

    python benchmarks/training/plot_losses.py out-1gpu/logs/losses.jsonl out-2gpu/logs/losses.jsonl \
        --labels "1 GPU" "2 GPUs" --keys token_loss diffusion_loss --output curves.png

Needs matplotlib (`pip install matplotlib`), which the package itself does not.
"""

import argparse
import json
from pathlib import Path


def read_losses(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def smooth(values, window):
    """Trailing mean over `window` steps: per-step losses of small batches are noisy."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="losses.jsonl files")
    parser.add_argument("--labels", nargs="+", default=None, help="one per run (default: the file paths)")
    parser.add_argument("--keys", nargs="+", default=["loss"], help="logged values to plot, one panel each")
    parser.add_argument("--smooth", type=int, default=20, help="trailing-mean window in steps (default: 20)")
    parser.add_argument("--output", default="losses.png")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = args.labels or args.runs
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels")
    figure, axes = plt.subplots(1, len(args.keys), figsize=(5 * len(args.keys), 3.5), squeeze=False)
    for path, label in zip(args.runs, labels):
        records = read_losses(path)
        for axis, key in zip(axes[0], args.keys):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, smooth(list(values), args.smooth), label=label)
    for axis, key in zip(axes[0], args.keys):
        axis.set_xlabel("optimizer step")
        axis.set_title(key)
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(args.output)


if __name__ == "__main__":
    main()
