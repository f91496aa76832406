"""Training curves (matplotlib): one run's train/validation loss, or several runs side by side.

``python -m dsv4.train.plot RUN_DIR... --out curves.png [--labels A B ...]`` compares runs
written by ``dsv4 train`` (their ``metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["read_metrics", "plot_runs"]


def read_metrics(run: str | Path) -> list[dict]:
    """The metric records of a run directory (``metrics.jsonl``).

    Raises ValueError naming the file when it is missing, unreadable or not JSON lines."""
    path = Path(run) / "metrics.jsonl"
    try:
        return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: no metrics of a dsv4 train run ({e})") from None


def _smooth(v: list[float], k: int) -> list[float]:
    out, acc = [], []
    for x in v:
        acc.append(x)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_runs(runs: Sequence[tuple[str, list[dict]]], out: str | Path,
              unigram: Optional[float] = None, title: str = "dsv4 train") -> None:
    """Write a PNG with the training loss (smoothed) and validation loss of each run.

    Args:
        runs: (label, metric records) per run.
        out: PNG path.
        unigram: draw the corpus unigram entropy (nats) as a reference line.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, (label, recs) in enumerate(runs):
        color = f"C{i}"
        tr = [r for r in recs if "loss" in r]
        va = [r for r in recs if "val_loss" in r]
        if tr:
            k = max(1, len(tr) // 50)
            ax.plot([r["step"] for r in tr], _smooth([r["loss"] for r in tr], k), color=color,
                    alpha=0.85, lw=1.2, label=f"{label} train")
        if va:
            ax.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o--", color=color,
                    ms=4, lw=1.2, label=f"{label} validation")
    if unigram is not None:
        ax.axhline(unigram, color="gray", ls=":", lw=1.2,
                   label=f"unigram entropy {unigram:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv4.train.plot",
                                 description="Plot the loss curves of dsv4 train runs.")
    ap.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--labels", nargs="*", help="one label per run (default: directory names)")
    ap.add_argument("--title", default="dsv4 train")
    args = ap.parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        ap.error("give one label per run")
    unigram = None
    for r in args.runs:
        info = Path(r) / "run.json"
        if info.is_file():
            unigram = json.loads(info.read_text()).get("unigram_entropy", unigram)
    try:
        runs = [(l, read_metrics(r)) for l, r in zip(labels, args.runs)]
    except ValueError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1
    plot_runs(runs, args.out, unigram, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
