"""Trains the recipe on one accelerator from in-memory arrays, without TensorFlow.

The tf.data pipeline (`launch.py`) augments on the host CPU: fast enough for CPU
training, far too slow to feed a GPU (benchmarks/README.md), and the lent GPU machine
has no TensorFlow. Here the whole dataset sits in accelerator
memory and each step draws its batch, augments it and trains in one compiled function.
The step itself is the project's (`train.train_step`: loss, gradient clipping, Adam,
BatchNorm and the weights' moving average); sampling and augmentation follow
`input_pipeline.py` (tumour fraction, flip, rotation, zoom, per-channel gain and
gamma, 2.5-D context slices). The learning rate warms up over steps and then follows a
cosine over a fixed wall-time budget, so a run of any speed ends its schedule on time.
Config fields it does not implement (per-slice normalisation, crops, area-weighted
sampling, the detection head, optimizers other than Adam) stop it with an error rather
than being ignored.

Three commands:

  # Where TF is installed: pack kaggle_3m losslessly (~200 MiB, a file per patient),
  # with the patient-level folds of configs/resunet.py.
  python benchmarks/train_on_device.py pack --data_dir=PATH/kaggle_3m --out_dir=PACK

  # On the accelerator: train one fold for a wall-time budget, validating as it goes;
  # writes the best (by mean per-volume Dice) and last moving-average weights
  # (`--no-last`: the best only).
  python benchmarks/train_on_device.py train --pack=PACK --fold=0 \\
      --seconds=400 --out=fold0.npz

  `--set FIELD=VALUE` (repeatable) overrides a field of the config, e.g.
  `--set model.features=(32,64,128,256) --set augment.rotate_degrees=30`; the
  overrides are stored with the weights and `export` applies them too.

The weights file becomes a checkpoint that `--mode=eval` and `--mode=predict` restore
with `export` (where TF is installed, to evaluate with the project's own evaluation):

  python benchmarks/train_on_device.py export --weights=fold0.npz \\
      --data_dir=PATH/kaggle_3m --out=DIR
"""

import argparse
import ast
import functools
import glob
import importlib
import itertools
import json
import lzma
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# input_pipeline.HEAD_LEVEL (that module imports TensorFlow): the tumour paste's head is
# where any channel exceeds it.
HEAD_LEVEL = 10.0


def _pack_patient(out: str, slices, fold_of: dict):
    from resunet_jax.data import lgg

    images, masks = zip(*(lgg.read_slice(s) for s in slices), strict=True)
    images, masks = np.stack(images), np.stack(masks)
    delta = np.diff(images, axis=2, prepend=np.zeros_like(images[:, :, :1]))
    np.savez(
        out,
        images=np.frombuffer(lzma.compress(delta.tobytes(), preset=6), np.uint8),
        masks=np.frombuffer(lzma.compress(np.packbits(masks, axis=-1).tobytes()), np.uint8),
        shape=np.array(images.shape),
        patient_id=np.array([s.patient_id for s in slices]),
        slice_index=np.array([s.index for s in slices]),
        fold=np.array([fold_of[s.patient_id] for s in slices]),
    )


def _config(name: str, overrides=()):
    """`get_config()` of configs/<name>.py with `FIELD=VALUE` overrides applied.

    Values are Python literals (`model.features=(32,64,128,256)`, `augment.flip=False`);
    a field the config lacks, or a value of another type, stops with one error.
    """
    import ml_collections

    config = importlib.import_module(f"configs.{name}").get_config()
    for item in overrides:
        field, sep, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string field such as loss=dice
        *parents, leaf = field.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        try:
            if not sep:
                raise ValueError("expected FIELD=VALUE")
            if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
                raise KeyError(f"configs/{name}.py has no field {field}")
            config.update_from_flattened_dict({field: value})
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"--set {item}: {e.args[0] if e.args else e}") from None
    return config


def pack(data_dir: str, out_dir: str, config_name: str = "resunet"):
    """Reads every slice of `data_dir` into one compressed file per patient.

    Images are delta-coded along rows and LZMA-compressed (lossless; ~80 KB a slice,
    MRI noise leaves little more to gain), masks bit-packed. A file per patient lets
    transfers to a machine be grouped under any size limit. Each slice carries its
    patient's validation fold under the config's `data.num_folds` / `data.split_seed`.
    """
    import concurrent.futures

    from resunet_jax.data import lgg

    data = _config(config_name).data
    slices = lgg.discover(data_dir)
    ids = lgg.patient_ids(slices)
    fold_of = {}
    for k in range(data.num_folds):
        for pid in lgg.split_patients(ids, data.num_folds, k, data.split_seed)[1]:
            fold_of[pid] = k
    os.makedirs(out_dir, exist_ok=True)
    # Threads: LZMA and TIFF decoding release the GIL (and forking a JAX process is unsafe).
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        jobs = [
            pool.submit(
                _pack_patient,
                os.path.join(out_dir, f"{pid}.npz"),
                list(patient_slices),
                fold_of,
            )
            # discover() lists slices in patient order.
            for pid, patient_slices in itertools.groupby(slices, lambda s: s.patient_id)
        ]
        for job in jobs:
            job.result()


def unpack(paths) -> dict:
    """The slices of `pack`'s files, concatenated.

    Returns:
        {"images": [N, S, S, 3] uint8, "masks": [N, S, S, 1] uint8 in {0, 1},
        "patient_id": [N] str, "slice_index": [N] int, "fold": [N] int}.
    """
    parts = []
    for path in paths:
        f = np.load(path)
        shape = tuple(f["shape"])
        delta = np.frombuffer(lzma.decompress(f["images"].tobytes()), np.uint8).reshape(shape)
        bits = np.frombuffer(lzma.decompress(f["masks"].tobytes()), np.uint8)
        masks = np.unpackbits(bits.reshape(shape[0], shape[1], -1), axis=-1)[..., : shape[2]]
        parts.append(
            {
                "images": np.cumsum(delta, axis=2, dtype=np.uint8),
                "masks": masks[..., None],
                "patient_id": f["patient_id"],
                "slice_index": f["slice_index"],
                "fold": f["fold"],
            }
        )
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def augment(key, images, masks, config):
    """`input_pipeline.augment_params` + `augment` in JAX, for a batch on the device.

    Args:
        key: PRNG key.
        images: [B, S, S, 3n] uint8 (n slices: `context.stack_context`).
        masks: [B, S, S, 1] uint8 in {0, 1}.
        config: `config.augment`.

    Returns:
        {"image": [B, S, S, 3n] float32 in [0, 1], "mask": [B, S, S, 1] uint8}.
    """
    import jax
    import jax.numpy as jnp

    b, s = images.shape[:2]
    k_flip, k_rot, k_zoom, k_gain, k_gamma = jax.random.split(key, 5)
    flip = jnp.where(jax.random.uniform(k_flip, (b,)) < 0.5, -1.0, 1.0) if config.flip else 1.0
    angle = jnp.deg2rad(
        jax.random.uniform(k_rot, (b,), minval=-config.rotate_degrees, maxval=config.rotate_degrees)
    )
    zoom = jax.random.uniform(k_zoom, (b,), minval=1 - config.scale, maxval=1 + config.scale)
    cos, sin = jnp.cos(angle) / zoom, jnp.sin(angle) / zoom
    # Output pixel (x, y) samples input c + R(angle)/zoom @ diag(flip, 1) @ ((x, y) - c).
    c = (s - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(s) - c, jnp.arange(s) - c, indexing="ij")
    src_x = c + (cos * flip)[:, None, None] * xx - sin[:, None, None] * yy
    src_y = c + (sin * flip)[:, None, None] * xx + cos[:, None, None] * yy
    missing = config.get("missing_sequences", 0.0)
    if missing:  # as input_pipeline.augment_params and drop_sequences
        k_drop, k_case = jax.random.split(jax.random.fold_in(key, 6))
        drop = jax.random.uniform(k_drop, (b,)) < missing
        case = jax.random.randint(k_case, (b,), 0, 3)  # 0: pre, 1: post, 2: both
        per_slice = images.reshape(*images.shape[:3], -1, 3)
        flair = per_slice[..., 1]
        pre = jnp.where((drop & (case != 1))[:, None, None, None], flair, per_slice[..., 0])
        post = jnp.where((drop & (case != 0))[:, None, None, None], flair, per_slice[..., 2])
        images = jnp.stack([pre, flair, post], -1).reshape(images.shape)
    slices = jnp.concatenate([images, masks], axis=-1).astype(jnp.float32)

    def warp(channel, y, x):  # bilinear, zeros outside, as input_pipeline.warp_bilinear
        return jax.scipy.ndimage.map_coordinates(channel, [y, x], order=1, mode="constant")

    per_channel = jax.vmap(warp, in_axes=(2, None, None), out_axes=2)
    slices = jax.vmap(per_channel)(slices, src_y, src_x)
    paste = config.get("tumor_paste", 0.0)
    if paste:  # as input_pipeline.augment_params and paste_tumours
        on = jax.random.uniform(jax.random.fold_in(key, 7), (b,)) < paste
        donor = jnp.roll(slices, -1, axis=0)
        head = slices[..., :-1].max(axis=-1, keepdims=True) > HEAD_LEVEL
        alpha = donor[..., -1:] * head * on[:, None, None, None]
        image = slices[..., :-1] * (1.0 - alpha) + donor[..., :-1] * alpha
        slices = jnp.concatenate([image, jnp.maximum(slices[..., -1:], alpha)], axis=-1)
    i, g = config.intensity, config.gamma
    # One gain and gamma per modality, shared by the context slices (one scanner).
    repeats = images.shape[-1] // 3
    gain = jax.random.uniform(k_gain, (b, 1, 1, 3), minval=1 - i, maxval=1 + i)
    gamma = jnp.exp(jax.random.uniform(k_gamma, (b, 1, 1, 3), minval=-g, maxval=g))
    gain, gamma = jnp.tile(gain, repeats), jnp.tile(gamma, repeats)
    image = jnp.clip(slices[..., :-1] * gain / 255.0, 0.0, 1.0) ** gamma
    return {"image": image, "mask": (slices[..., -1:] >= 0.5).astype(jnp.uint8)}


def _flatten(variables: dict, prefix: str) -> dict:
    from flax import traverse_util

    flat = traverse_util.flatten_dict(variables, sep=".")
    return {f"{prefix}.{k}": np.asarray(v) for k, v in flat.items()}


def _unflatten(weights, prefix: str) -> dict:
    from flax import traverse_util

    start = prefix + "."
    flat = {k[len(start) :]: weights[k] for k in weights.files if k.startswith(start)}
    return traverse_util.unflatten_dict(flat, sep=".")


def train(args):
    import jax
    import jax.numpy as jnp
    import optax

    from resunet_jax import context, losses, metrics, models
    from resunet_jax import train as train_lib

    paths = sorted(glob.glob(os.path.join(args.pack, "*.npz")))
    if not paths:
        raise SystemExit(f"{args.pack}: no .npz files; write them with `pack` first")
    data = unpack(paths)
    config = _config(args.config, args.set)
    config.data.image_size = data["images"].shape[1]
    config.data.fold = args.fold
    config.model.dtype = args.dtype
    config.batch_size = args.batch
    config.optimizer.learning_rate = args.lr
    config.num_train_steps = 1  # unused: the optimizer below takes its rate per step
    unsupported = {
        "data.normalization": (config.data.normalization, "scale"),
        "data.crop_size": (config.data.crop_size, None),
        "data.tumor_area_weight": (config.data.tumor_area_weight, 0.0),
        "data.soft_masks": (config.data.soft_masks, False),
        "augment.elastic": (config.augment.elastic, 0.0),
        "augment.blur": (config.augment.blur, 0.0),
        "augment.noise": (config.augment.noise, 0.0),
        "model.detection_head": (config.model.detection_head, False),
        "optimizer.name": (config.optimizer.name, "adam"),
    }
    for field, (value, supported) in unsupported.items():
        if value != supported:
            raise SystemExit(f"{field}={value!r}: this script trains only {field}={supported!r}")
    if config.data.tumor_fraction is None:
        raise SystemExit("data.tumor_fraction=None: this script samples at a set tumour fraction")

    def say(**row):
        line = json.dumps({"fold": args.fold, "out": os.path.basename(args.out), **row})
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(line + "\n")

    val = data["fold"] == args.fold
    if not val.any() or val.all():
        raise SystemExit(f"{args.pack}: fold {args.fold} must hold some but not all patients")
    train_idx = np.flatnonzero(~val)
    has_tumor = data["masks"][train_idx].any(axis=(1, 2, 3))
    # Each slice's 2.5-D context ([N, 1] = itself alone when data.context_slices is 0).
    rows = context.context_rows(data["patient_id"], data["slice_index"], config.data.context_slices)
    on_device = {
        "images": jnp.asarray(data["images"]),
        "masks": jnp.asarray(data["masks"]),
        "context": jnp.asarray(rows),
        "tumor_idx": jnp.asarray(train_idx[has_tumor]),
        "clean_idx": jnp.asarray(train_idx[~has_tumor]),
    }
    val_images = jnp.asarray(context.stack_context(data["images"], rows[val]))
    val_masks = data["masks"][val]
    val_ids = data["patient_id"][val]
    say(train_slices=len(train_idx), val_slices=int(val.sum()), val_patients=len(set(val_ids)))

    model = models.create_model(config.model)
    eval_model = models.create_model(config.model, axis_name=None)
    state = train_lib.create_train_state(jax.random.key(config.seed + args.fold), config, model)
    # The learning rate is an input of each step (the cosine follows wall time).
    clip = config.optimizer.grad_clip_norm
    tx = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(
            optax.clip_by_global_norm(clip), optax.adam(learning_rate, eps=config.optimizer.eps)
        )
    )(learning_rate=0.0)
    state = state.replace(tx=tx, opt_state=tx.init(state.params))
    step_fn = functools.partial(
        train_lib.train_step,
        loss_fn=losses.get_loss(config.loss),
        ema_decay=config.ema_decay,
    )

    @jax.jit
    def step(state, data, key, lr):
        k_pick, k_t, k_c, k_aug = jax.random.split(key, 4)
        b = config.batch_size
        pick = jax.random.uniform(k_pick, (b,)) < config.data.tumor_fraction
        t = data["tumor_idx"][jax.random.randint(k_t, (b,), 0, data["tumor_idx"].shape[0])]
        c = data["clean_idx"][jax.random.randint(k_c, (b,), 0, data["clean_idx"].shape[0])]
        idx = jnp.where(pick, t, c)
        images = context.stack_context(data["images"], data["context"][idx])
        batch = augment(k_aug, images, data["masks"][idx], config.augment)
        hyper = dict(state.opt_state.hyperparams, learning_rate=lr)
        state = state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))
        # vmap over a leading axis of 1 names the "batch" axis that the step's
        # collectives (global loss, BatchNorm statistics) reduce over.
        batch = jax.tree.map(lambda x: x[None], batch)
        new_state, m = jax.vmap(step_fn, in_axes=(None, 0), axis_name="batch")(state, batch)
        return jax.tree.map(lambda x: x[0], (new_state, m))

    @jax.jit
    def predict(variables, images):
        out = eval_model.apply(variables, images.astype(jnp.float32) / 255.0, train=False)
        return out["mask"] > 0

    def validate(variables) -> dict:
        preds = np.concatenate(
            [
                np.asarray(predict(variables, val_images[i : i + 128]))
                for i in range(0, val_images.shape[0], 128)
            ]
        )
        counts = {k: np.asarray(v) for k, v in metrics.slice_counts(preds, val_masks).items()}
        dice = [r["dice"] for r in metrics.per_patient(val_ids, counts).values()]
        dice = [d for d in dice if not np.isnan(d)]
        return {"dice_mean": float(np.mean(dice)), "dice_median": float(np.median(dice))}

    def save(best, last_ema, steps: int) -> dict:
        scores, best_step, best_ema = best
        meta = {
            "config": args.config,
            "overrides": list(args.set),
            "image_size": config.data.image_size,
            "fold": args.fold,
            "steps": steps,
            "best_step": best_step,
            "best": scores,
            "seconds": args.seconds,
            "batch": args.batch,
            "lr": args.lr,
            "dtype": args.dtype,
            "jax": jax.__version__,
            "device": str(jax.devices()[0].device_kind),
        }
        tmp = args.out + ".tmp.npz"
        np.savez(
            tmp,
            meta=json.dumps(meta),
            **_flatten(best_ema, "best"),
            **(_flatten(jax.device_get(last_ema), "last") if args.last else {}),
        )
        os.replace(tmp, args.out)
        return meta

    key = jax.random.key(1000 * (config.seed + 1) + args.fold)
    # Compiled ahead, so that the wall-time budget is all training.
    step = step.lower(state, on_device, key, jnp.float32(0)).compile()
    warmup = config.optimizer.warmup_steps * 4
    start = time.time()
    last_val, best, step_num, history = start, None, 0, []
    while True:
        elapsed = time.time() - start
        frac = min(elapsed / args.seconds, 1.0)
        lr = (
            args.lr
            * min(1.0, (step_num + 1) / warmup)
            * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * frac)))
        )
        state, m = step(state, on_device, jax.random.fold_in(key, step_num), jnp.float32(lr))
        step_num += 1
        history.append(m)
        done = elapsed >= args.seconds
        if step_num % 100 == 0 or done:
            m = jax.device_get(history)
            history = []
            say(
                step=step_num,
                seconds=round(time.time() - start, 1),
                lr=float(lr),
                loss=float(np.mean([h["loss"] for h in m])),
                train_dice=float(np.mean([h["dice"] for h in m])),
            )
        if time.time() - last_val >= args.val_seconds or done:
            last_val = time.time()
            ema = jax.device_get(state.ema)
            scores = validate(ema)
            say(step=step_num, val=scores)
            if best is None or scores["dice_mean"] > best[0]["dice_mean"]:
                best = (scores, step_num, ema)
                save(best, state.ema, step_num)  # a run cut short keeps its best
        if done:
            break
    meta = save(best, state.ema, step_num)
    say(done=meta)


def export(args):
    """Writes one set of weights of a `train` file as a checkpoint for eval/predict.

    Like a checkpoint of `launch.py` training, it stores the validation metrics of its
    fold's patients, whose detection threshold (chosen on them) eval and predict use.
    """
    import jax
    import tensorflow as tf

    from resunet_jax import checkpointing, evaluate
    from resunet_jax.data import sources

    # As in launch.py: tf.data runs on the host, and TensorFlow must not take accelerator
    # memory from JAX.
    tf.config.set_visible_devices([], "GPU")
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out}: already exists; export to a new --out (nothing written)")
    weights = np.load(args.weights)
    if not any(k.startswith(args.which + ".") for k in weights.files):
        raise SystemExit(f"{args.weights}: holds no {args.which!r} weights (trained --no-last?)")
    meta = json.loads(str(weights["meta"]))
    config = _config(meta["config"], meta.get("overrides", ()))
    config.data.dir = args.data_dir
    config.data.image_size = meta["image_size"]
    config.data.fold = meta["fold"]
    # Trained in meta["dtype"] (mixed precision: float32 parameters); evaluated and
    # run in float32, which the CPU computes faster than bfloat16.
    config.model.dtype = "float32"
    config.batch_size = meta["batch"]
    config.optimizer.learning_rate = meta["lr"]
    config.num_train_steps = meta["steps"]
    step = meta["best_step"] if args.which == "best" else meta["steps"]
    variables = jax.tree.map(np.asarray, _unflatten(weights, args.which))
    source = sources.open_source(config, args.out)
    val_metrics, _ = evaluate.Evaluator(source, config, source.val_ids).run(variables)
    checkpointing.export_model(
        args.out,
        variables,
        {
            "step": step,
            "config": checkpointing.config_json(config),
            "train_patients": sorted(source.train_ids),
            "val_metrics": val_metrics,
            "trained_on_device": meta,
        },
    )
    print(json.dumps({"exported": args.out, "step": step, "val_metrics": val_metrics, **meta}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--data_dir", required=True)
    a.add_argument("--out_dir", required=True)
    a.add_argument("--config", default="resunet", help="configs/<name>.py: its folds")
    a = sub.add_parser("train")
    a.add_argument("--pack", required=True, help="folder of pack's .npz files")
    a.add_argument("--config", default="resunet", help="configs/<name>.py: model, recipe")
    a.add_argument("--fold", type=int, default=0)
    a.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field, e.g. model.features=(32,64,128,256); repeatable",
    )
    a.add_argument("--seconds", type=float, default=400.0, help="training wall-time budget")
    a.add_argument("--val_seconds", type=float, default=30.0, help="validate this often")
    a.add_argument("--batch", type=int, default=32)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    a.add_argument("--out", required=True)
    a.add_argument(
        "--last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also store the last weights (--no-last: the best only, half the file)",
    )
    a.add_argument("--log", default="")
    a = sub.add_parser("export")
    a.add_argument("--weights", required=True)
    a.add_argument("--which", default="best", choices=["best", "last"])
    a.add_argument("--data_dir", required=True, help="the packed kaggle_3m folder")
    a.add_argument("--out", required=True)
    args = p.parse_args()
    {
        "pack": lambda: pack(args.data_dir, args.out_dir, args.config),
        "train": lambda: train(args),
        "export": lambda: export(args),
    }[args.command]()


if __name__ == "__main__":
    main()
