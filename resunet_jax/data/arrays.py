"""The slices of chosen patients as numpy arrays at the model's input side; no TensorFlow.

Evaluation reads a folder through `load`: each patient's slices decoded with tifffile
(`lgg.read_slice`), resized (`preprocess.resize_images`, `preprocess.resize_masks`) and,
with the masks as read (evaluation scores at each slice's own size), cached in
`prepared_root/<lgg.fingerprint>/arrays_<S>/<patient>.npz`. Keyed as the TFDS is, so
two folders never share a cache and an edited folder is read again; one file per
patient, so a split reads only its own patients.
"""

import concurrent.futures
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from resunet_jax import errors, preprocess
from resunet_jax.data import lgg
from resunet_jax.workdir import atomic_write

# What each patient's cache file holds, and what `load` returns (plus "patient_id").
KEYS = ("image", "mask", "original_mask", "orig_height", "orig_width", "slice_index")


def cache_dir(data_dir: str, slices: list[lgg.Slice], image_size: int, prepared_root: str):
    """The folder of `data_dir`'s cached arrays at side `image_size`."""
    return os.path.join(prepared_root, lgg.fingerprint(data_dir, slices), f"arrays_{image_size}")


def load(
    data_dir: str,
    slices: list[lgg.Slice],
    patient_ids,
    image_size: int,
    prepared_root: str,
) -> dict:
    """Every slice of `patient_ids`, resized to `image_size`, in patient then slice order.

    Patients not yet cached are read and cached first (by process 0; the other
    processes wait for it).

    Args:
        data_dir: kaggle_3m-style folder.
        slices: `lgg.discover(data_dir)`: the whole folder, which keys the cache.
        patient_ids: the patients to load (at least one).
        image_size: model input side S.
        prepared_root: parent folder of all prepared data (`sources.prepared_root`).

    Returns:
        {"image": [N, S, S, 3] uint8, "mask": [N, S, S, 1] uint8 in {0, 1},
        "original_mask": [N, H, W] uint8 in {0, 1}, the masks as read (H x W the largest
        slice; smaller ones zero-padded right and below), "orig_height"/"orig_width":
        [N] int32 each slice's size, "patient_id": [N] str, "slice_index": [N] int32}.

    Raises:
        DataError: one error naming every unusable file of these patients.
    """
    if not patient_ids:
        raise errors.DataError(f"{data_dir}: no patients to load")
    folder = cache_dir(data_dir, slices, image_size, prepared_root)
    patient_ids = sorted(patient_ids)
    if jax.process_index() == 0:
        _write_missing(data_dir, slices, patient_ids, image_size, folder)
    multihost_utils.sync_global_devices("resunet_jax arrays cached")
    # In threads: zlib releases the GIL while it inflates, most of a read's time.
    with concurrent.futures.ThreadPoolExecutor() as pool:
        parts = list(pool.map(_read, [_path(folder, pid) for pid in patient_ids]))
    out = {k: np.concatenate([p[k] for p in parts]) for k in KEYS if k != "original_mask"}
    out["original_mask"] = _pad_stack([p["original_mask"] for p in parts])
    out["patient_id"] = np.repeat(patient_ids, [len(p["image"]) for p in parts])
    return out


def _read(path: str) -> dict:
    with np.load(path) as cached:
        return {k: cached[k] for k in KEYS}


def _path(folder: str, patient_id: str) -> str:
    return os.path.join(folder, f"{patient_id}.npz")


def _write_missing(data_dir, slices, patient_ids, image_size, folder):
    """Reads and caches the patients of `patient_ids` that have no cache file yet.

    Every file is read before anything is written, so one error names them all.
    """
    wanted = [pid for pid in patient_ids if not os.path.exists(_path(folder, pid))]
    by_patient = {pid: [s for s in slices if s.patient_id == pid] for pid in wanted}
    read, problems = {}, []
    for pid, patient_slices in by_patient.items():
        if not patient_slices:
            raise errors.DataError(f"{data_dir}: no slices of patient {pid}")
        read[pid] = []
        for s in patient_slices:
            try:
                read[pid].append(lgg.read_slice(s))
            except errors.DataError as e:
                problems.append(str(e))
    if problems:
        raise lgg.unusable_files(data_dir, problems)
    os.makedirs(folder, exist_ok=True)
    for pid, pairs in read.items():
        arrays = _resize_patient(pairs, image_size)
        arrays["slice_index"] = np.array([s.index for s in by_patient[pid]], np.int32)
        path = _path(folder, pid)
        with atomic_write(path, "wb") as f:  # a killed run leaves no partial file
            np.savez_compressed(f, **arrays)


def _resize_patient(pairs: list, image_size: int) -> dict:
    """One patient's (image [H, W, 3], mask [H, W]) slices -> the cached arrays but
    "slice_index"."""
    # Slice by slice, as `inference.Predictor` resizes: the same inputs, bit for bit.
    images = [preprocess.resize_images(image[None], image_size) for image, _ in pairs]
    masks = [preprocess.resize_masks(mask[None], image_size) for _, mask in pairs]
    shapes = np.array([mask.shape for _, mask in pairs], np.int32)
    return {
        "image": np.concatenate(images),
        "mask": np.concatenate(masks),
        "original_mask": _pad_stack([mask[None] for _, mask in pairs]),
        "orig_height": shapes[:, 0],
        "orig_width": shapes[:, 1],
    }


def _pad_stack(masks: list) -> np.ndarray:
    """[n_i, H_i, W_i] arrays -> [sum n_i, max H_i, max W_i], zero-padded right and below."""
    h = max(m.shape[1] for m in masks)
    w = max(m.shape[2] for m in masks)
    out = np.zeros((sum(len(m) for m in masks), h, w), masks[0].dtype)
    start = 0
    for m in masks:  # each copied once: the stack of a whole split is hundreds of MB
        out[start : start + len(m), : m.shape[1], : m.shape[2]] = m
        start += len(m)
    return out
