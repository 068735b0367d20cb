"""The benchmarks run and print valid JSON (no timing is asserted)."""

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
    rows = _run("benchmarks/speed.py", "--batch", "4", "--sizes", "32,64", "--steps", "1")
    assert [r["size"] for r in rows] == [32, 64]
    for r in rows:
        assert r["impl"] == "jax" and r["params"] == 1_206_129 and r["batch"] == 4
        assert r["train_images_per_s"] > 0 and r["infer_images_per_s"] > 0


def test_input_pipeline_benchmark_reports_images_per_second():
    (row,) = _run(
        "benchmarks/input_pipeline.py", "--image_size", "32", "--batch", "8", "--batches", "2"
    )
    assert row["images_per_s"] > 0 and row["image_size"] == 32
