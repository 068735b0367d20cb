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
