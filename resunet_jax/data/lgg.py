"""The LGG MRI dataset in the Kaggle `kaggle_3m` layout: discovery, decoding, splits.

A data folder holds one folder per patient, each with `<patient>_<k>.tif` images
(H x W x 3 uint8: pre-contrast, FLAIR, post-contrast) and `<patient>_<k>_mask.tif`
masks (H x W, 0/255). Slice numbers are not zero-padded, so slices sort numerically.
No TensorFlow: the prepared forms of a folder (`tfds_lgg`, `arrays`) are keyed by its
`fingerprint` and built from `read_slice`.
"""

import dataclasses
import hashlib
import os
import re

import numpy as np
import tifffile

from resunet_jax.errors import DataError

_SLICE_FILE = re.compile(r"^(?P<stem>.+)_(?P<index>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Slice:
    """One slice of one patient: its image and mask files."""

    patient_id: str
    index: int
    image_path: str
    mask_path: str


def discover(data_dir: str) -> list[Slice]:
    """Lists every slice under a kaggle_3m-style folder, in patient then slice order.

    Args:
        data_dir: folder with one sub-folder per patient.

    Returns:
        Slices sorted by patient id and numeric slice index.

    Raises:
        DataError: missing folder, no patient folders, or an image without its mask
            (or a mask without its image).
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: data folder does not exist")
    slices = []
    for patient_id in sorted(os.listdir(data_dir)):
        patient_dir = os.path.join(data_dir, patient_id)
        if not os.path.isdir(patient_dir):
            continue
        images, masks = {}, {}
        for name in os.listdir(patient_dir):
            match = _SLICE_FILE.match(name)
            if match:
                target = masks if match["mask"] else images
                target[int(match["index"])] = os.path.join(patient_dir, name)
        for index in sorted(images.keys() - masks.keys()):
            raise DataError(f"{images[index]}: image has no mask (expected *_{index}_mask.tif)")
        for index in sorted(masks.keys() - images.keys()):
            raise DataError(f"{masks[index]}: mask has no image")
        slices += [Slice(patient_id, i, images[i], masks[i]) for i in sorted(images)]
    if not slices:
        raise DataError(f"{data_dir}: no patient folders with <patient>_<k>.tif slices found")
    return slices


def read_image(path: str) -> np.ndarray:
    """Reads an MRI slice: [H, W, 3] uint8 (uncompressed or compressed TIFF)."""
    image = read_tif(path)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise DataError(
            f"{path}: expected an H x W x 3 uint8 image, got shape {image.shape} {image.dtype}"
        )
    return image


def read_mask(path: str) -> np.ndarray:
    """Reads a tumour mask: [H, W] uint8 in {0, 1} (stored as 0/255 or 0/1)."""
    mask = read_tif(path)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise DataError(f"{path}: expected an H x W mask, got shape {mask.shape}")
    values = np.unique(mask)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        raise DataError(f"{path}: mask values must be 0/255 (or 0/1), found {values[:8].tolist()}")
    return (mask > 0).astype(np.uint8)


def read_slice(s: Slice) -> tuple[np.ndarray, np.ndarray]:
    """Reads and checks one slice: (image [H, W, 3] uint8, mask [H, W] uint8 in {0, 1})."""
    image, mask = read_image(s.image_path), read_mask(s.mask_path)
    if image.shape[:2] != mask.shape:
        raise DataError(
            f"{s.mask_path}: mask shape {mask.shape} does not match its image {image.shape[:2]}"
        )
    return image, mask


def validate(slices: list[Slice]) -> list[str]:
    """Reads every slice; returns one line per unusable file (empty: all usable).

    Run before preparing so that every bad file is reported at once, before training.
    """
    problems = []
    for s in slices:
        try:
            read_slice(s)
        except DataError as e:
            problems.append(str(e))
    return problems


def unusable_files(data_dir: str, problems: list[str]) -> DataError:
    """The one error that names every unusable file of `data_dir` (`validate`'s lines)."""
    return DataError(
        f"{data_dir}: {len(problems)} unusable file(s), nothing prepared:\n" + "\n".join(problems)
    )


def read_tif(path: str) -> np.ndarray:
    """Reads any TIFF as an array; a damaged or non-TIFF file raises DataError naming it."""
    try:
        return tifffile.imread(path)
    except Exception as e:  # tifffile raises many types for damaged files
        raise DataError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from e


def patient_ids(slices: list[Slice]) -> list[str]:
    """Sorted unique patient ids of `slices`."""
    return sorted({s.patient_id for s in slices})


def split_patients(ids: list[str], num_folds: int, fold: int, seed: int) -> tuple[list, list]:
    """Deterministic patient-level k-fold split.

    Slices of one patient are strongly correlated, so a slice-level split would leak.

    Args:
        ids: patient ids (any order).
        num_folds: number of folds k >= 2.
        fold: which fold (0 <= fold < k) is the validation set.
        seed: permutation seed.

    Returns:
        (train_ids, val_ids), each sorted.
    """
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold={fold} must be in [0, num_folds={num_folds})")
    if len(ids) < num_folds:
        raise DataError(
            f"{len(ids)} patients are too few for data.num_folds={num_folds}: "
            "each fold needs at least one patient"
        )
    ordered = np.array(sorted(ids))
    folds = np.array_split(np.random.default_rng(seed).permutation(ordered), num_folds)
    val = sorted(folds[fold].tolist())
    return sorted(set(ordered.tolist()) - set(val)), val


def fingerprint(data_dir: str, slices: list[Slice]) -> str:
    """A key of the source folder: its real path and every file's name, size and mtime."""
    digest = hashlib.sha256(os.path.realpath(data_dir).encode())
    for s in slices:
        for path in (s.image_path, s.mask_path):
            stat = os.stat(path)
            digest.update(
                f"{os.path.relpath(path, data_dir)}:{stat.st_size}:{stat.st_mtime_ns}".encode()
            )
    return digest.hexdigest()[:16]
