"""Synthetic phantom brain MRI in the kaggle_3m layout: the built-in default dataset.

Each patient is a stack of axial slices: an elliptical brain inside a bright skull ring,
tissue texture and noise, dark ventricles, and one irregular lesion spanning a run of
consecutive slices, bright in FLAIR (channel 1) and only faintly different in the other
channels. Intensity alone does not segment it: the skull is as bright in FLAIR, and the
ventricles' rims and a few small spots are normal structures with the lesion's own
intensity, told apart only by shape and size. Written as .tif files exactly like the
real data (half the patients zlib-compressed), so the whole real-data path runs on it.
"""

import json
import math
import os
import re
import shutil

import numpy as np
import tifffile
from scipy import ndimage

_MARKER = "synthetic.json"
# Part of the marker: bumped whenever the phantom changes, so older datasets are redone.
_VERSION = 2
_PATIENT_DIR = re.compile(r"^TCGA_SY_A\d{3}_20000101$")


def _smooth_noise(rng: np.random.Generator, shape: tuple, sigma: tuple) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit std, float32 of `shape`."""
    # A short kernel: the field only has to look smooth, and this dominates the runtime.
    field = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), sigma, truncate=2.0)
    return field / (field.std() + 1e-6)


def phantom_volume(
    rng: np.random.Generator, num_slices: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One patient's phantom.

    Args:
        rng: random generator; the volume is a pure function of its state.
        num_slices: number of axial slices Z.
        size: slice side S in pixels.

    Returns:
        (images uint8 [Z, S, S, 3] with channels pre-contrast, FLAIR, post-contrast;
        masks uint8 [Z, S, S] with values 0 and 255). Every volume has a lesion.
    """
    # Random scalars stay Python floats so that the arrays stay float32 (not float64).
    uniform = rng.uniform
    shape = (num_slices, size, size)
    z = np.linspace(-1.0, 1.0, num_slices, dtype=np.float32)[:, None, None]
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y, x = axis[:, None], axis[None, :]

    cy, cx = uniform(-0.08, 0.08), uniform(-0.08, 0.08)
    ay, ax = uniform(0.62, 0.78), uniform(0.5, 0.65)
    # Like a real head, the brain's cross-section shrinks towards the first/last slices.
    scale = np.sqrt(np.clip(1.0 - (0.9 * z) ** 2, 0.05, 1.0))
    r = np.hypot((y - cy) / (ay * scale), (x - cx) / (ax * scale))
    brain = r < 1.0
    skull = (r >= 1.06) & (r < 1.06 + uniform(0.08, 0.14))

    # Two ventricles beside the midline in the central slices.
    vscale = np.sqrt(np.clip(1.0 - (z / 0.6) ** 2, 1e-3, 1.0))
    vy, vx = cy + uniform(-0.1, 0.05) * ay, uniform(0.1, 0.16) * ax
    vry, vrx = vscale * (uniform(0.2, 0.28) * ay), vscale * (uniform(0.07, 0.1) * ax)
    vr = np.minimum(
        np.hypot((y - vy) / vry, (x - cx - vx) / vrx),
        np.hypot((y - vy) / vry, (x - cx + vx) / vrx),
    )
    ventricles = (vr < 1.0) & brain
    ventricle_rims = (vr >= 1.0) & (vr < 1.5) & (np.abs(z) < 0.6)

    spots = np.zeros(shape, bool)
    for _ in range(rng.integers(2, 6)):
        k = int(rng.integers(num_slices))
        angle, radius = uniform(0.0, 2 * math.pi), uniform(0.2, 0.8) * float(scale[k, 0, 0])
        sy, sx = cy + radius * ay * math.sin(angle), cx + radius * ax * math.cos(angle)
        disc = np.hypot(y - sy, x - sx) < uniform(0.03, 0.05)
        spots[k : k + int(rng.integers(1, 3))] |= disc

    # The lesion: an off-centre ellipsoid with an irregular boundary over ~30-50% of the
    # slices. Its centre lies on a slice and inside the brain there, so no volume is
    # lesion-free.
    kc = round((num_slices - 1) / 2 + uniform(-0.15, 0.15) * num_slices)
    extent = uniform(0.15, 0.25) * num_slices
    angle, radius = uniform(0.0, 2 * math.pi), uniform(0.25, 0.5)
    ly, lx = cy + radius * ay * math.sin(angle), cx + radius * ax * math.cos(angle)
    ry, rx = uniform(0.15, 0.3), uniform(0.15, 0.3)
    slice_pos = (np.arange(num_slices, dtype=np.float32)[:, None, None] - kc) / extent
    ell = slice_pos**2 + ((y - ly) / ry) ** 2 + ((x - lx) / rx) ** 2
    ell *= np.exp(0.3 * _smooth_noise(rng, shape, (num_slices / 16, size / 16, size / 16)))
    lesion = (ell < 1.0) & brain & ~ventricles
    # One connected lesion, so its slices form a single run: the noise can split off islands.
    components, _ = ndimage.label(lesion)
    lesion = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    # Partial volume: contrast fades over the lesion's outer rim.
    lesion_profile = np.where(lesion, 0.6 + 0.4 * np.clip((1.0 - ell) / 0.3, 0.0, 1.0), 0.0)
    distractors = (ventricle_rims | spots) & brain & ~lesion

    # Per channel (pre-contrast, FLAIR, post-contrast):
    tissue = [90.0 + uniform(-8.0, 8.0), 80.0 + uniform(-8.0, 8.0), 95.0 + uniform(-8.0, 8.0)]
    csf = [35.0, 25.0, 40.0]  # dark on T1 and, fluid-suppressed, on FLAIR
    lesion_gain = [uniform(-15.0, 5.0), uniform(60.0, 90.0), uniform(-5.0, 20.0)]
    skull_level = uniform(160.0, 200.0)
    distractor_gain = uniform(0.7, 1.0)
    shared = _smooth_noise(rng, shape, (1.0, size / 20, size / 20))
    head = brain | skull
    images = np.empty((*shape, 3), np.uint8)
    for c in range(3):
        # Texture partly shared across channels, so no channel difference cancels it.
        texture = 0.6 * shared + 0.8 * _smooth_noise(rng, shape, (1.0, size / 20, size / 20))
        channel = np.where(brain, tissue[c] + 10.0 * texture, 0.0)
        channel = np.where(ventricles, csf[c], channel)
        channel += lesion_gain[c] * (lesion_profile + distractor_gain * distractors)
        channel = np.where(skull, skull_level + 8.0 * texture, channel)
        channel += 5.0 * rng.standard_normal(shape, np.float32) * head
        images[..., c] = np.clip(channel, 0, 255)
    masks = np.where(lesion, 255, 0).astype(np.uint8)
    return images, masks


def write_synthetic_dataset(
    root: str | os.PathLike,
    num_patients: int = 12,
    slices_per_patient: int = 20,
    size: int = 128,
    seed: int = 0,
) -> list[str]:
    """Writes a phantom dataset in the kaggle_3m layout under `root`, once.

    `root/data.csv` lists the patients; each `root/<patient>/` holds
    `<patient>_<k>.tif` (S x S x 3 uint8) and `<patient>_<k>_mask.tif` (S x S uint8,
    0/255) for k = 1..slices_per_patient, not zero-padded.

    Args:
        root: output folder, created if needed.
        num_patients: number of patients, `TCGA_SY_A001_20000101`, ...
        slices_per_patient: slices per patient.
        size: slice side S in pixels.
        seed: the dataset is a pure function of its parameters.

    Returns:
        The sorted patient ids. If `root/synthetic.json` (written last, so an interrupted
        generation is redone) records the same parameters, nothing is rewritten.
    """
    root = os.fspath(root)
    params = {
        "version": _VERSION,
        "num_patients": num_patients,
        "slices_per_patient": slices_per_patient,
        "size": size,
        "seed": seed,
    }
    ids = [f"TCGA_SY_A{i:03d}_20000101" for i in range(1, num_patients + 1)]
    marker = os.path.join(root, _MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return ids
        os.remove(marker)
    os.makedirs(root, exist_ok=True)
    # Patients or slices left from other parameters would silently join the dataset.
    for name in os.listdir(root):
        if _PATIENT_DIR.match(name):
            shutil.rmtree(os.path.join(root, name))
    rng = np.random.default_rng(seed)
    for i, pid in enumerate(ids):
        images, masks = phantom_volume(rng, slices_per_patient, size)
        folder = os.path.join(root, pid)
        os.makedirs(folder)
        # The real data come both uncompressed and zlib-compressed; readers must take both.
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
