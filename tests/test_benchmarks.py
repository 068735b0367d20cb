"""The scripts under benchmarks/ run: valid JSON, real training and export (no timing asserted)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_speed_prints_the_torch_script_schema():
    args = ["--batch", "4", "--sizes", "32,64", "--steps", "1", "--backends", "jax,onnx"]
    rows = _run("benchmarks/speed.py", *args)
    assert [(r["impl"], r["size"]) for r in rows] == [
        ("jax", 32),
        ("onnxruntime", 32),
        ("jax", 64),
        ("onnxruntime", 64),
    ]
    for r in rows:
        assert r["params"] == 1_206_129 and r["batch"] == 4 and r["infer_images_per_s"] > 0
    assert all(r["train_images_per_s"] > 0 for r in rows if r["impl"] == "jax")


def test_input_pipeline_benchmark_reports_images_per_second():
    (row,) = _run(
        "benchmarks/input_pipeline.py", "--image_size", "32", "--batch", "8", "--batches", "2"
    )
    assert row["images_per_s"] > 0 and row["image_size"] == 32


def test_paired_dice_compares_the_shared_patients(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import paired_dice

    for name, rows in (
        ("a", [("P1", "0.5"), ("P2", "0.7"), ("P3", "")]),
        ("b", [("P1", "0.6"), ("P2", "0.6"), ("P4", "0.9")]),
    ):
        with open(tmp_path / f"{name}.csv", "w") as f:
            f.write("patient_id,num_slices,dice\n")
            f.writelines(f"{p},3,{d}\n" for p, d in rows)
    result = paired_dice.paired(
        paired_dice.read_dice(str(tmp_path / "a.csv")),
        paired_dice.read_dice(str(tmp_path / "b.csv")),
    )
    assert result["patients"] == 2 and (result["better"], result["worse"]) == (1, 1)
    assert result["mean_a"] == 0.6 and result["mean_b"] == 0.6 and result["mean_difference"] == 0.0
    assert result["ci95"][0] == -0.1 and result["ci95"][1] == 0.1  # resamples of +-0.1
