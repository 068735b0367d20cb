"""Images per second out of the tf.data batch source (decode, resize, cache, sample, batch).

  python benchmarks/input_pipeline.py --data_dir ../shared/data/lgg/kaggle_3m \
      --image_size 256 --batch 64 --batches 100

Prepares the data once (as training does), fills the cache with one pass, then times
`--batches` batches of the device-shaped uint8 stream (augmentation runs on the devices,
in the train step: benchmarks/speed.py times it). Prints one JSON line with images/s
overall and per CPU core.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="", help="kaggle_3m folder; empty: synthetic")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=100)
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import tensorflow as tf

    from configs import resunet
    from resunet_jax import input_pipeline
    from resunet_jax.data import sources

    # As in launch.py: tf.data runs on the host, and TensorFlow must not take accelerator
    # memory from JAX.
    tf.config.set_visible_devices([], "GPU")
    config = resunet.get_config()
    config.data.dir = args.data_dir
    config.data.image_size = args.image_size
    with tempfile.TemporaryDirectory() as workdir:
        source = sources.open_source(config, workdir, tfds=True)
        ds = input_pipeline.create_train_dataset(
            source.builder, source.train_ids, config, args.batch, seed=0
        )
        batches = input_pipeline.as_numpy(ds)
        warmup = -(-len(source.train_ids) * 40 // args.batch)  # fills the cache
        for _ in range(min(warmup, 60)):
            next(batches)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        elapsed = time.perf_counter() - start
    images_per_s = args.batches * args.batch / elapsed
    print(
        json.dumps(
            {
                "pipeline": "train (tfdata source)",
                "data": args.data_dir or "synthetic",
                "image_size": args.image_size,
                "batch": args.batch,
                "cores": os.cpu_count(),
                "images_per_s": round(images_per_s, 1),
                "images_per_s_per_core": round(images_per_s / os.cpu_count(), 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
