#!/usr/bin/python3
"""Average the CSVs of runs made one seed at a time into one CSV over all
their seeds, as a run with --seeds LIST would have written it.

    /usr/bin/python3 examples/combine_seeds.py out.csv seed1.csv seed2.csv ...

Long runs (the paper's settings for linear-4L and linear-6L take 10-30 min
per seed here) are easier to spread over sessions one seed per process:
`linear_dynamics --full --models linear-6L --seeds 3 --csv s3.csv`. Each
input holds method,position,loss,stderr,seeds rows of one run; rows are
matched by method and position, every input must hold the same rows, and an
input that is already a mean over several seeds is refused (its seeds' own
values are gone). The output has the mean over inputs and its standard error
(sample standard deviation / sqrt(k)), the same formula as the programs'
mean_over_seeds (examples/curve_report.hpp), written with the same %.9g, so
it equals the in-process mean up to the last printed digit of the inputs.
"""
import csv
import math
import sys


def read(path):
    rows = {}
    order = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"method", "position", "loss", "seeds"}
        if not need <= set(reader.fieldnames or []):
            sys.exit(f"combine_seeds: {path}: needs columns {sorted(need)}")
        for r in reader:
            if int(r["seeds"]) != 1:
                sys.exit(f"combine_seeds: {path}: row {r['method']},{r['position']} is a mean over "
                         f"{r['seeds']} seeds; give one-seed runs")
            key = (r["method"], int(r["position"]))
            if key in rows:
                sys.exit(f"combine_seeds: {path}: row {key} appears twice")
            rows[key] = float(r["loss"])
            order.append(key)
    return order, rows


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    out, inputs = argv[0], argv[1:]
    if out in inputs:
        sys.exit("combine_seeds: the output must not be one of the inputs")
    runs = [read(p) for p in inputs]
    order = runs[0][0]
    for p, (o, _) in zip(inputs[1:], runs[1:]):
        if sorted(o) != sorted(order):
            sys.exit(f"combine_seeds: {p} holds other rows than {inputs[0]}")
    k = len(runs)
    with open(out, "w") as f:
        f.write("method,position,loss,stderr,seeds\n")
        for key in order:
            values = [rows[key] for _, rows in runs]
            mean = sum(values) / k
            se = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1) / k) if k > 1 else 0.0
            f.write(f"{key[0]},{key[1]},{mean:.9g},{se:.9g},{k}\n")
    print(f"wrote {out} ({len(order)} rows, {k} seeds)")


if __name__ == "__main__":
    main(sys.argv[1:])
