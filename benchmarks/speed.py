"""Training and inference speed of the project's real train step and predict function.

Prints one JSON line per image size, in the schema of the PyTorch copy of the seed model
used as the speed yardstick (benchmarks/README.md), so the two can be compared side by
side (run both in one session, alternating):

  python benchmarks/speed.py --device cpu --batch 8 --sizes 128,256
  python benchmarks/speed.py --device gpu --batch 64 --sizes 256 --dtype bfloat16
  python benchmarks/speed.py --device cpu --batch 8 --sizes 256 --backends jax,onnx

Inputs are random, non-zero, in memory (no TensorFlow is imported, so this also runs
where TF is absent). The step is the one training uses (pmap over all local devices,
the recipe's augmentation of the uint8 batch, global-batch loss, Adam), with BCE loss
and no detection head, like the torch script.
Times are medians over `--steps` timed steps after warm-up (compilation excluded).
With `--backends` including onnx, the same model (same weights) is exported as
`--mode=export` exports it and its inference on ONNX Runtime (`backends.OnnxModel`, the
onnx backend of eval and predict) is timed too, on one more line ("impl": "onnxruntime",
no train fields); with openvino, OpenVINO's bf16 (where the CPU has it), f32 and INT8
(`export.write_int8`, calibrated on the timed batch) lines ("impl": "openvino-bf16", ...):

  python benchmarks/speed.py --device cpu --batch 8 --sizes 256 --backends onnx,openvino
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_seconds(fn, state, batch, num_steps: int) -> float:
    """Median wall time of `fn(state, batch)` over `num_steps` calls after 3 warm-ups.

    A train step's output state feeds the next call, as in training.
    """
    import jax

    times = []
    for i in range(3 + num_steps):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(state, batch))
        if i >= 3:
            times.append(time.perf_counter() - start)
        state = out if hasattr(out, "params") else state
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "tpu"])
    p.add_argument("--batch", type=int, default=8, help="global batch (split over devices)")
    p.add_argument("--sizes", default="256")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backends", default="jax", help="comma-separated: jax, onnx, openvino")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads; 0 = its default")
    args = p.parse_args()
    timed = args.backends.split(",")
    os.environ.setdefault("JAX_PLATFORMS", args.device)

    import jax

    from configs import resunet
    from resunet_jax import backends, config_schema, export, models, parallel, train

    config = resunet.get_config()
    config.model.dtype = args.dtype
    config.model.detection_head = False
    config.optimizer.grad_clip_norm = 0.0
    config.optimizer.warmup_steps = 0
    config.num_train_steps = 1000
    config.loss = "bce"
    config.batch_size = args.batch
    model = models.create_model(config.model)
    # As training runs it: uint8 slices in, augmented and normalised inside the step.
    train_step = train.pmapped_train_step(config)
    predict_step = backends.pmapped_predict_step(model)
    rng = np.random.default_rng(0)
    for size in [int(s) for s in args.sizes.split(",")]:
        config.data.image_size = size
        state = train.create_train_state(jax.random.key(0), config, model)
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        batch = parallel.shard_batch(
            parallel.split_for_devices(
                {
                    "image": rng.integers(10, 256, (args.batch, size, size, 3), dtype=np.uint8),
                    "mask": (rng.uniform(size=(args.batch, size, size, 1)) > 0.7).astype(np.uint8),
                }
            )
        )
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        steps = {
            "train": lambda s, b: train_step(s, b)[0],
            "infer": lambda _, b, v=variables: predict_step(v, {"image": b["image"] / 255.0})[1],
        }

        result = {
            "impl": "jax",
            "version": jax.__version__,
            "device": str(jax.devices()[0].platform),
            "devices": jax.local_device_count(),
            "threads": os.cpu_count(),
            "params": int(n_params),
            "size": size,
            "batch": args.batch,
            "amp_bf16": args.dtype == "bfloat16",
            "compile": True,  # XLA always compiles
        }
        if "jax" in timed:
            for name, fn in steps.items():
                median = _median_seconds(fn, state, batch, args.steps)
                result[f"{name}_ms_per_step"] = round(1000 * median, 2)
                result[f"{name}_images_per_s"] = round(args.batch / median, 2)
            print(json.dumps(result), flush=True)
        if "onnx" in timed or "openvino" in timed:
            meta = {"step": 0, "config": config_schema.config_json(config)}
            images = np.asarray(batch["image"]).reshape(args.batch, size, size, 3) / np.float32(255)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.onnx")
                export.write_onnx(variables, meta, path)
                models_timed = []
                if "onnx" in timed:
                    models_timed.append(backends.OnnxModel(path, args.threads))
                if "openvino" in timed:
                    # INT8 calibrated on the random inputs themselves: for speed only.
                    export.write_int8(path, {"network": images})
                    for precision in ("bf16", "f32", "int8"):
                        if precision == "bf16" and backends.cpu_float_precision() != "bf16":
                            continue
                        target = backends.int8_path(path) if precision == "int8" else path
                        models_timed.append(backends.OpenvinoModel(target, precision, args.threads))
                for graph_model in models_timed:
                    median = _median_seconds(
                        lambda _, x, m=graph_model: m(x), None, images, args.steps
                    )
                    line = _graph_result(result, graph_model, args.threads, median)
                    print(json.dumps(line), flush=True)


def _graph_result(jax_result: dict, model, threads: int, median: float) -> dict:
    """The line of an exported graph's engine (ONNX Runtime, OpenVINO in one precision):
    the JAX line's model and input fields, its own timing."""
    if model.backend == "onnx":
        import onnxruntime as engine

        impl, device = "onnxruntime", model.providers[0]
    else:
        import openvino as engine

        impl, device = f"openvino-{model.precision}", "CPU"
    keep = ("params", "size", "batch")
    return {
        "impl": impl,
        "version": engine.__version__,
        "device": device,
        "devices": 1,
        "threads": threads or os.cpu_count(),
        **{k: jax_result[k] for k in keep},
        "amp_bf16": model.precision == "bf16",
        "compile": False,
        "infer_ms_per_step": round(1000 * median, 2),
        "infer_images_per_s": round(jax_result["batch"] / median, 2),
    }


if __name__ == "__main__":
    main()
