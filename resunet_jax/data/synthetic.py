"""Synthetic phantom brain MRI in the kaggle_3m layout: the built-in default dataset.

Each patient is a stack of axial slices: an elliptical brain inside a bright skull
ring, smooth tissue texture and noise, and one irregular lesion spanning a run of
consecutive slices, bright in FLAIR (channel 1) and faint in the other channels. The
skull is as bright as the lesion, so intensity alone does not segment it. Written as
.tif files exactly like the real data (half the patients zlib-compressed), so the whole
real-data path runs on it unchanged.
"""

import json
import os

import numpy as np
import tifffile
from scipy import ndimage

_MARKER = "synthetic.json"


def _smooth_noise(rng, shape, sigma):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def phantom_volume(
    rng: np.random.Generator, num_slices: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One patient's phantom.

    Args:
        rng: random generator (the volume is a pure function of its state).
        num_slices: number of axial slices Z.
        size: slice side S.

    Returns:
        (images uint8 [Z, S, S, 3], masks uint8 [Z, S, S] in {0, 255}).
    """
    z = np.linspace(-1.0, 1.0, num_slices)[:, None, None]
    y, x = np.mgrid[-1.0 : 1.0 : size * 1j, -1.0 : 1.0 : size * 1j]
    cy, cx = rng.uniform(-0.08, 0.08, 2)
    ay, ax = rng.uniform(0.62, 0.78), rng.uniform(0.5, 0.65)
    # Like a real head, the brain's cross-section shrinks towards the first/last slices.
    scale = np.sqrt(np.clip(1.0 - (0.9 * z) ** 2, 0.05, 1.0))
    r = np.sqrt(((y - cy) / (ay * scale)) ** 2 + ((x - cx) / (ax * scale)) ** 2)
    brain = r < 1.0
    skull = (r >= 1.04) & (r < 1.16)

    # The lesion: an ellipsoid with a noisy boundary over ~30-50% of the slices.
    extent = rng.uniform(0.3, 0.5) * num_slices / 2
    lz = rng.uniform(-0.3, 0.3) * num_slices / 2
    ly, lx = cy + rng.uniform(-0.3, 0.3) * ay, cx + rng.uniform(-0.3, 0.3) * ax
    ry, rx = rng.uniform(0.12, 0.25, 2)
    slice_pos = (np.arange(num_slices)[:, None, None] - (num_slices - 1) / 2 - lz) / extent
    ell = slice_pos**2 + ((y - ly) / ry) ** 2 + ((x - lx) / rx) ** 2
    boundary = 0.25 * _smooth_noise(rng, (num_slices, size, size), (1.0, size / 16, size / 16))
    lesion = (ell + boundary < 1.0) & brain

    texture = _smooth_noise(rng, (num_slices, size, size), (1.0, size / 20, size / 20))
    images = np.zeros((num_slices, size, size, 3), np.float32)
    base = np.array([90.0, 80.0, 95.0])  # pre-contrast, FLAIR, post-contrast
    lesion_gain = np.array([10.0, 85.0, 25.0])
    for c in range(3):
        channel = np.where(brain, base[c] + 12.0 * texture, 0.0)
        channel += np.where(skull, 170.0, 0.0)
        channel += np.where(lesion, lesion_gain[c], 0.0)
        channel += rng.normal(0.0, 6.0, channel.shape) * (brain | skull)
        images[..., c] = channel
    images = np.clip(images, 0, 255).astype(np.uint8)
    masks = np.where(lesion, 255, 0).astype(np.uint8)
    return images, masks


def write_synthetic_dataset(
    root: str | os.PathLike,
    num_patients: int = 12,
    slices_per_patient: int = 20,
    size: int = 128,
    seed: int = 0,
) -> list[str]:
    """Writes a phantom dataset in the kaggle_3m layout under `root` (once).

    Args:
        root: output folder, created if needed.
        num_patients: number of patient folders.
        slices_per_patient: slices per patient, numbered 1.. (not zero-padded).
        size: slice side in pixels.
        seed: the dataset is a pure function of its parameters.

    Returns:
        Sorted patient ids. A complete dataset with the same parameters (recorded in
        `root/synthetic.json`, written last) is kept as it is.
    """
    root = os.fspath(root)
    params = dict(
        num_patients=num_patients, slices_per_patient=slices_per_patient, size=size, seed=seed
    )
    ids = [f"TCGA_SY_A{i:03d}_20000101" for i in range(1, num_patients + 1)]
    marker = os.path.join(root, _MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return ids
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, pid in enumerate(ids):
        images, masks = phantom_volume(rng, slices_per_patient, size)
        folder = os.path.join(root, pid)
        os.makedirs(folder, exist_ok=True)
        # The real data come both uncompressed (Kaggle) and zlib-compressed.
        compression = "zlib" if i % 2 else None
        for k in range(slices_per_patient):
            stem = os.path.join(folder, f"{pid}_{k + 1}")
            tifffile.imwrite(f"{stem}.tif", images[k], compression=compression)
            tifffile.imwrite(f"{stem}_mask.tif", masks[k], compression=compression)
    with open(os.path.join(root, "data.csv"), "w") as f:
        f.write("Patient;source\n" + "".join(f"{pid};synthetic\n" for pid in ids))
    with open(marker, "w") as f:
        json.dump(params, f)
    return ids
