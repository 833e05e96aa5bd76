#!/usr/bin/python3
"""Turn mesaopt's tidy loss CSVs (header `method,position,loss`, optionally
followed by `stderr,seeds`) into PNG figures like the paper's
loss-vs-context-length plots; where a curve is a mean over several seeds, a
band of +-1 standard error is drawn around it.

    /usr/bin/python3 examples/plot.py results.csv -o docs/figures/linear_dynamics.png
    /usr/bin/python3 examples/plot.py a.csv b.csv --methods ridge,mesa-1L --logy

Needs numpy and matplotlib from Debian (python3-numpy python3-matplotlib), hence
/usr/bin/python3 rather than whatever python3 is first on PATH.
"""
import argparse
import csv
import sys
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_curves(paths):
    """Returns {method: (positions, losses, stderrs)} in file order (stderr nan
    where the file has none); later files may add methods."""
    curves = OrderedDict()
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"method", "position", "loss"} - set(reader.fieldnames or [])
            if missing:
                sys.exit(f"{path}: missing column(s) {sorted(missing)}; expected header method,position,loss")
            for row in reader:
                pos, loss = int(row["position"]), float(row["loss"])
                se = float(row.get("stderr") or "nan")
                curves.setdefault(row["method"], ([], [], []))
                curves[row["method"]][0].append(pos)
                curves[row["method"]][1].append(loss)
                curves[row["method"]][2].append(se)
    out = OrderedDict()
    for name, (pos, loss, se) in curves.items():
        order = np.argsort(pos)
        out[name] = (np.asarray(pos)[order], np.asarray(loss)[order], np.asarray(se)[order])
    return out


def finish(fig, ax, title, logy, out, legend_size):
    """Axis labels, scale, title, grid and legend of a loss-vs-context figure; saves it to out."""
    ax.set_xlabel("context length t")
    ax.set_ylabel("loss  1/2 ||s_{t+1} - prediction||^2")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, ncol=2)
    fig.tight_layout()
    fig.savefig(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", help="tidy CSV file(s): method,position,loss")
    ap.add_argument("-o", "--out", default="loss_vs_context.png", help="output PNG (default: %(default)s)")
    ap.add_argument("--methods", help="comma-separated subset of methods to draw, in this order")
    ap.add_argument("--logy", action="store_true", help="logarithmic loss axis")
    ap.add_argument("--title", default="In-context loss vs context length")
    args = ap.parse_args()

    curves = read_curves(args.csv)
    names = list(curves)
    if args.methods:
        names = [m.strip() for m in args.methods.split(",")]
        unknown = [m for m in names if m not in curves]
        if unknown:
            sys.exit(f"unknown method(s) {unknown}; the CSV has {list(curves)}")

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name in names:
        pos, loss, se = curves[name]
        # Learners dashed, trained models solid, the noise floor dotted.
        style = ":" if "floor" in name else ("-" if name.endswith("L") else "--")
        (line,) = ax.plot(pos, loss, style, label=name, linewidth=1.6)
        if np.all(np.isfinite(se)):
            ax.fill_between(pos, loss - se, loss + se, color=line.get_color(), alpha=0.2, linewidth=0)
    finish(fig, ax, args.title, args.logy, args.out, legend_size=8)
    print(f"wrote {args.out} ({len(names)} curves)")


if __name__ == "__main__":
    main()
