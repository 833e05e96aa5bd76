#!/usr/bin/python3
"""Figures for the analysis programs' CSVs (docs/examples.md).

    /usr/bin/python3 examples/plot_analysis.py linearize A.csv [B.csv ...] --labels a,b -o ratios.png
    /usr/bin/python3 examples/plot_analysis.py probing probing.csv -o probes.png

linearize: the test-loss ratio linearised / original per layer after the block
training (rows kind=linear with trained > 0 of `linearize --csv`), one group of
bars per layer and one bar per file, on a log axis, with the paper's ranges
(docs/paper.md §4: 2-3.6 for layer 1, 1.0-1.2 for layers >= 3) shaded.

probing: probe R^2 against context position for every layer, one panel per
target (`probing --csv`: target,layer,position,r2,...; the rows whose
position is "mean" are left out).

Needs numpy and matplotlib from Debian (python3-numpy python3-matplotlib), hence
/usr/bin/python3.
"""
import argparse
import csv
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(path, required):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            sys.exit(f"plot_analysis.py: {path} has no column(s) {', '.join(missing)}")
        return list(reader)


def linearize(paths, labels, out, title):
    if labels and len(labels) != len(paths):
        sys.exit(f"plot_analysis.py: --labels has {len(labels)} names for {len(paths)} files (expected equal)")
    labels = labels or paths
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(paths)
    layers_seen = set()
    for i, (path, label) in enumerate(zip(paths, labels)):
        rows = [r for r in read_rows(path, ["layer", "kind", "trained", "ratio"])
                if r["kind"] == "linear" and int(r["trained"]) > 0]
        if not rows:
            sys.exit(f"plot_analysis.py: {path} has no rows of a trained linearised block")
        layers = [int(r["layer"]) for r in rows]
        layers_seen.update(layers)
        ax.bar([l - 0.4 + width * (i + 0.5) for l in layers], [float(r["ratio"]) for r in rows], width, label=label)
    last = max(layers_seen)
    ax.fill_between([0.55, 1.45], 2.0, 3.6, color="grey", alpha=0.25, label="paper's range")
    ax.fill_between([2.55, last + 0.45], 1.0, 1.2, color="grey", alpha=0.25)
    ax.set_yscale("log")
    ax.set_xticks(sorted(layers_seen))
    ax.set_xlabel("layer replaced by linear attention")
    ax.set_ylabel("test-loss ratio linearised / original")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_title(title or "Linearising one layer of softmax-7L")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def probing(path, out, title):
    # Rows with position "mean" are the per-layer means over positions.
    rows = [r for r in read_rows(path, ["target", "layer", "position", "r2"]) if r["position"].isdigit()]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    layers = sorted({int(r["layer"]) for r in rows})
    fig, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets), 3.4), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, target in zip(axes[0], targets):
        for l in layers:
            pts = [(int(r["position"]), float(r["r2"])) for r in rows
                   if r["target"] == target and int(r["layer"]) == l and math.isfinite(float(r["r2"]))]
            ax.plot([p for p, _ in pts], [v for _, v in pts], color=cmap(l / max(1, layers[-1])),
                    label=f"h{l}" if l else "h0 (embedding)")
        ax.set_title(target)
        ax.set_xlabel("position t")
        ax.set_ylim(-0.1, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("probe R^2 (held out)")
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["linearize", "probing"])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("-o", "--out", required=True, help="output PNG")
    ap.add_argument("--labels", help="linearize: comma-separated legend names, one per file")
    ap.add_argument("--title")
    args = ap.parse_args()
    if args.kind == "linearize":
        linearize(args.csv, args.labels.split(",") if args.labels else None, args.out, args.title)
    else:
        if len(args.csv) != 1:
            ap.error("probing takes one CSV")
        probing(args.csv[0], args.out, args.title)


if __name__ == "__main__":
    main()
