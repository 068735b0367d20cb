"""Runs a trained model on a user's own scans: .tif slices in, masks, overlays and a CSV out.

Input: one .tif, a folder of .tif slices, or a folder of patient folders (`*_mask.tif`
files are ground truth and skipped). Each slice is brought to the model's input the way
training saw it: 1-channel images are replicated to 3 channels, 16-bit and float images
rescaled to 0..255, any size resized to `data.image_size`; a model trained with
"volume" normalisation takes its statistics from all readable slices of the slice's
folder (one folder = one patient's volume), and a 2.5-D model (`data.context_slices`)
its neighbouring slices from the readable slices of the folder in natural order
(`x_2.tif` before `x_10.tif`). The predicted mask is resized back to the slice's own
size; with `eval.postprocess=largest_component` each folder's masks keep only their
largest 3D connected component, as evaluation does. A file that cannot be used gets one
error line naming it and a row in predictions.csv; the other files are still processed.
"""

import csv
import os
import re

import jax
import numpy as np
import tifffile
from absl import logging
from jax.experimental import multihost_utils

from resunet_jax import (
    context,
    evaluate,
    export,
    input_pipeline,
    parallel,
    postprocess,
    visualize,
)
from resunet_jax.data import lgg

CSV_NAME = "predictions.csv"
CSV_FIELDS = ("file", "tumor_probability", "tumor", "predicted_area_pixels", "mask_file", "error")


def find_inputs(path: str) -> list[str]:
    """The .tif slices at `path` (a file, a folder, or a folder of folders), sorted.

    Raises:
        lgg.DataError: `path` does not exist or holds no .tif slice.
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise lgg.DataError(f"{path}: no such file or folder")
    found, visited = [], set()
    # Folders of links to patient folders are common on shared storage, so links are
    # followed; each real folder is read once, which also ends any link cycle.
    for folder, subfolders, names in os.walk(path, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        found += [
            os.path.join(folder, n)
            for n in names
            if n.lower().endswith((".tif", ".tiff")) and "_mask." not in n.lower()
        ]
    if not found:
        raise lgg.DataError(f"{path}: no .tif slices found")
    return sorted(found, key=_natural_key)


def _natural_key(path: str):
    """Sorts `x_2.tif` before `x_10.tif` (slice numbers are not zero-padded)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def load_slice(path: str) -> np.ndarray:
    """Reads a user's slice as [H, W, 3] uint8.

    Accepts [H, W] (grey, replicated), [H, W, 1|3|4] (alpha dropped) and [3, H, W];
    uint16/int/float images are rescaled by their own range to 0..255.

    Raises:
        lgg.DataError: unreadable, not an image, an unsupported shape or pixel type,
            or non-finite pixels.
    """
    image = lgg.read_tif(path)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 8:
        raise lgg.DataError(
            f"{path}: not a 2-D slice (shape {image.shape}; expected [H, W], "
            "[H, W, 1|3|4] or [3, H, W], at least 8x8; save a stack one slice per file)"
        )
    image = image[..., :3] if image.shape[-1] == 4 else image
    image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    if image.dtype != np.uint8:
        if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
            raise lgg.DataError(f"{path}: unsupported pixel type {image.dtype}")
        image = image.astype(np.float64)
        # A NaN pixel would cast to an arbitrary uint8 value and an inf spoil the range,
        # so both are errors rather than silently wrong inputs.
        bad = int((~np.isfinite(image).all(axis=-1)).sum())
        if bad:
            raise lgg.DataError(f"{path}: {bad} non-finite pixels (NaN or inf)")
        lo, hi = image.min(), image.max()
        image = np.round((image - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)).astype(np.uint8)
    return image


def _write_prediction(path, image, mask, tumor_prob, base, out_dir) -> dict:
    """Writes one slice's mask (and overlay if tumour); returns its CSV row.

    Args:
        path: the input file.
        image: [H, W, 3] uint8 slice as read.
        mask: [H, W] bool predicted mask, after the detection gate.
        tumor_prob: slice tumour probability.
        base: input root; outputs mirror the path below it.
        out_dir: output folder.
    """
    rel = os.path.splitext(os.path.relpath(path, base))[0]
    mask_path = os.path.join(out_dir, f"{rel}_pred_mask.tif")
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    tifffile.imwrite(mask_path, (mask * 255).astype(np.uint8), compression="zlib")
    if mask.any():
        visualize.overlay_png(image, mask, os.path.join(out_dir, f"{rel}_overlay.png"))
    return {
        "file": path,
        "tumor_probability": round(tumor_prob, 6),
        "tumor": bool(mask.any()),
        "predicted_area_pixels": int(mask.sum()),
        "mask_file": mask_path,
        "error": "",
    }


def _read_slices(paths, config, rows) -> list[tuple]:
    """Reads slices into model inputs ("volume" statistics and context slices: over all
    of `paths`, one patient's folder in slice order); unusable files become error rows.

    Returns:
        (path, image [H, W, 3] uint8 as read, model input [S, S, C] float32) of each
        readable file.
    """
    read = []
    for path in paths:
        try:
            image = load_slice(path)
        except lgg.DataError as e:
            logging.error("%s", e)
            rows.append(dict.fromkeys(CSV_FIELDS, "") | {"file": path, "error": str(e)})
            continue
        empty_mask = np.zeros(image.shape[:2] + (1,), np.uint8)
        resized = input_pipeline.resize_example(
            {"image": image, "mask": empty_mask}, config.data.image_size
        )["image"]
        read.append((path, image, resized))
    if not read:
        return []
    resized = np.stack([r[2] for r in read])
    stats = None
    if config.data.normalization == "volume":
        moments = np.asarray(input_pipeline.slice_moments(resized)).sum(axis=0)
        stats = input_pipeline.volume_stats(moments)
    k = config.data.context_slices
    if k:  # the folder's slices in natural order are the volume's axis
        neighbours = context.context_rows(np.zeros(len(read)), np.arange(len(read)), k)
        resized = context.stack_context(resized, neighbours)
    model_in = np.asarray(input_pipeline.normalize(resized, config.data.normalization, stats))
    return [(path, image, x) for (path, image, _), x in zip(read, model_in, strict=True)]


def _predict_masks(step, variables, slices, batch_size: int, threshold: float):
    """Predicts `_read_slices`' output in batches of `batch_size`.

    Returns:
        ([N, H, W] bool masks at each slice's own size after the detection gate, H x W
        the largest slice's, smaller ones padded with False; [N] slice tumour
        probabilities).
    """
    probs, tumor_probs = [], []
    for start in range(0, len(slices), batch_size):
        chunk = np.stack([s[2] for s in slices[start : start + batch_size]])
        padded, n = parallel.pad_batch({"image": chunk}, batch_size)
        _, out = step(variables, parallel.split_for_devices(padded))
        probs.append(np.asarray(out["mask"]).reshape(-1, *out["mask"].shape[2:])[:n])
        tumor_probs.append(np.asarray(out["tumor"]).reshape(-1)[:n])
    tumor_probs = np.concatenate(tumor_probs)
    heights, widths = zip(*(s[1].shape[:2] for s in slices), strict=True)
    masks = postprocess.masks_at_original_size(np.concatenate(probs), heights, widths)
    masks &= (tumor_probs >= threshold)[:, None, None]  # called tumour-free: empty
    return masks, tumor_probs


def predict(config, workdir: str) -> list[dict]:
    """Predicts every slice under `config.predict.input` into `workdir/predict/`.

    Returns:
        The predictions.csv rows.
    """
    variables, meta = export.restore(config, config.checkpoint or workdir)
    config = evaluate.checkpoint_config(config, meta)
    threshold = meta.get("val_metrics", {}).get("detection_threshold", 0.5)
    step = export.predict_step(config)
    root = config.predict.input
    paths = find_inputs(root)
    base = root if os.path.isdir(root) else os.path.dirname(root)
    out_dir = os.path.join(workdir, "predict")
    if jax.process_index() == 0:
        evaluate.keep_earlier(out_dir, CSV_NAME)
    if jax.process_count() > 1:  # every process writes the same files: none before the move
        multihost_utils.sync_global_devices("resunet_jax earlier predictions kept")
    os.makedirs(out_dir, exist_ok=True)
    rows, batch_size = [], -(-config.eval.batch_size // jax.local_device_count())
    batch_size *= jax.local_device_count()
    postprocess.check_method(config.eval.postprocess)
    largest_component = config.eval.postprocess == "largest_component"
    if config.data.normalization == "volume" or config.data.context_slices or largest_component:
        # Statistics, neighbouring slices and 3D components are per folder (one
        # patient's volume): its slices are read and predicted together.
        folders = {}
        for path in paths:
            folders.setdefault(os.path.dirname(path), []).append(path)
        groups = list(folders.values())
    else:  # a batch at a time, so any number of slices fits in memory
        groups = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    for group in groups:
        slices = _read_slices(group, config, rows)
        if not slices:
            continue
        masks, tumor_probs = _predict_masks(step, variables, slices, batch_size, threshold)
        if largest_component:  # as evaluation does: after the detection gate
            masks = postprocess.largest_component_3d(masks)
        for (path, image, _), mask, prob in zip(slices, masks, tumor_probs, strict=True):
            h, w = image.shape[:2]
            rows.append(_write_prediction(path, image, mask[:h, :w], float(prob), base, out_dir))
    csv_path = os.path.join(out_dir, CSV_NAME)
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)
    failed = sum(1 for r in rows if r["error"])
    logging.info(
        "Predicted %d slices (%d with tumour, %d failed) into %s",
        len(rows) - failed,
        sum(1 for r in rows if r["tumor"] is True),
        failed,
        out_dir,
    )
    if failed == len(rows):
        raise lgg.DataError(f"{root}: none of the {len(rows)} .tif files could be used")
    return rows
