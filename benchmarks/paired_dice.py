"""Paired per-patient comparison of two evaluations of the same patients.

  python benchmarks/paired_dice.py RUN_A/eval/per_patient.csv RUN_B/eval/per_patient.csv

Prints one JSON line: both means of the per-volume Dice over the patients both score
(patients without tumour have no Dice and are left out), the mean paired difference
B - A, its 95% percentile bootstrap interval over patients (the patients, not the
slices, are the independent units), and how many patients B scores better or worse.
"""

import argparse
import csv
import json

import numpy as np


def read_dice(path: str) -> dict:
    with open(path) as f:
        return {r["patient_id"]: float(r["dice"]) for r in csv.DictReader(f) if r["dice"]}


def paired(a: dict, b: dict, resamples: int = 20000, seed: int = 0) -> dict:
    """The mean paired difference b - a over the shared patients, with its bootstrap CI."""
    ids = sorted(set(a) & set(b))
    if not ids:
        raise SystemExit("the two evaluations share no patient with a Dice")
    diff = np.array([b[p] - a[p] for p in ids])
    picks = np.random.default_rng(seed).integers(0, len(ids), (resamples, len(ids)))
    low, high = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
    return {
        "patients": len(ids),
        "mean_a": round(float(np.mean([a[p] for p in ids])), 4),
        "mean_b": round(float(np.mean([b[p] for p in ids])), 4),
        "mean_difference": round(float(diff.mean()), 4),
        "ci95": [round(float(low), 4), round(float(high), 4)],
        "better": int((diff > 0).sum()),
        "worse": int((diff < 0).sum()),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", help="per_patient.csv of the reference (A)")
    p.add_argument("b", help="per_patient.csv of the compared run (B)")
    p.add_argument("--resamples", type=int, default=20000)
    args = p.parse_args()
    result = paired(read_dice(args.a), read_dice(args.b), args.resamples)
    print(json.dumps({"a": args.a, "b": args.b, **result}), flush=True)


if __name__ == "__main__":
    main()
