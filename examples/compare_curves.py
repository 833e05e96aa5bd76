#!/usr/bin/python3
"""Compare a run's per-position loss curves with the paper's (Fig. 4), method
by method and position by position.

    /usr/bin/python3 examples/compare_curves.py run.csv
    /usr/bin/python3 examples/compare_curves.py run.csv --paper docs/figures/paper_fig4_curves.csv \
        --out compare.png

run.csv is what the examples write with --csv (method,position,loss and, from
runs over several seeds, stderr,seeds); the paper's file has
method,position,loss (docs/paper.md §4). For every method in both files it
prints the averages over positions, the ratio ours / paper at chosen
positions, the largest |ratio - 1| over t >= 2 and, where the run has
standard errors, how many positions lie within 2 of them of the paper's value
(the paper's own seed-to-seed error is not published, so this counts our
sampling error only). --out draws both sets of curves (ours solid with a ±1
s.e. band, the paper's dashed); it needs matplotlib (python3-matplotlib).
"""
import argparse
import csv
import math
import os
import sys

# The paper's names for our rows where they differ.
PAPER_NAME = {"lsq-lagged": "lsq-exact-lagged"}


def read(path):
    """{method: {position: (loss, stderr)}}; stderr is nan where absent."""
    out = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"method", "position", "loss"} - set(reader.fieldnames or [])
        if missing:
            sys.exit(f"{path}: missing column(s) {sorted(missing)}")
        for row in reader:
            se = float(row.get("stderr") or "nan")
            out.setdefault(row["method"], {})[int(row["position"])] = (float(row["loss"]), se)
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the run's CSV (--csv of an example)")
    ap.add_argument("--paper", default=os.path.join(here, "..", "docs", "figures", "paper_fig4_curves.csv"),
                    help="the paper's curves (default: docs/figures/paper_fig4_curves.csv)")
    ap.add_argument("--positions", default="1,2,5,10,20,30,40,50", help="positions to show")
    ap.add_argument("--out", help="also draw both sets of curves into this PNG")
    args = ap.parse_args()

    ours, paper = read(args.run), read(args.paper)
    show = [int(p) for p in args.positions.split(",")]
    pairs = [(m, PAPER_NAME.get(m, m)) for m in ours if PAPER_NAME.get(m, m) in paper]
    if not pairs:
        sys.exit(f"no method of {args.run} is in {args.paper} ({sorted(paper)})")

    head = f"{'method':12s} {'avg ours':>9s} {'paper':>8s} {'ratio':>6s} " + " ".join(f"{'t=' + str(t):>6s}" for t in show)
    print("ours / paper per position\n" + head + f" {'max|r-1| t>=2':>13s} {'within 2 s.e.':>13s}")
    for m, pm in pairs:
        common = sorted(set(ours[m]) & set(paper[pm]))
        avg_o = sum(ours[m][t][0] for t in common) / len(common)
        avg_p = sum(paper[pm][t][0] for t in common) / len(common)
        ratios = {t: ours[m][t][0] / paper[pm][t][0] for t in common if paper[pm][t][0] > 0}
        worst = max((abs(ratios[t] - 1) for t in common if t >= 2 and t in ratios), default=float("nan"))
        ses = [(t, ours[m][t][1]) for t in common if math.isfinite(ours[m][t][1]) and ours[m][t][1] > 0]
        within = (f"{sum(abs(ours[m][t][0] - paper[pm][t][0]) <= 2 * se for t, se in ses)}/{len(ses)}"
                  if ses else "-")
        cells = " ".join(f"{ratios[t]:6.3f}" if t in ratios else f"{'-':>6s}" for t in show)
        print(f"{m:12s} {avg_o:9.4f} {avg_p:8.4f} {avg_o / avg_p:6.3f} {cells} {100 * worst:12.1f}% {within:>13s}")

    if args.out:
        import matplotlib.pyplot as plt  # plot.py selects the file-only backend

        import plot

        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for m, pm in pairs:
            t = sorted(ours[m])
            y = [ours[m][p][0] for p in t]
            se = [ours[m][p][1] for p in t]
            (line,) = ax.plot(t, y, "-", linewidth=1.6, label=f"{m} (ours)")
            if all(math.isfinite(s) for s in se):
                ax.fill_between(t, [a - s for a, s in zip(y, se)], [a + s for a, s in zip(y, se)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
            tp = sorted(paper[pm])
            ax.plot(tp, [paper[pm][p][0] for p in tp], "--", color=line.get_color(), linewidth=1.2,
                    label=f"{pm} (paper)")
        plot.finish(fig, ax, "This run (solid) vs the paper's Fig. 4 (dashed)", True, args.out, legend_size=7)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
