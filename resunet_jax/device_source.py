"""Batch source "device" (`data.pipeline="device"`): the training split in device memory.

Every device holds the training slices as uint8 (82 LGG patients at 256 px: 0.8 GB)
and draws its share of each global batch inside the train step (`sample`), so the host
does nothing per step: the choice for accelerators, whose step outruns any host
pipeline, and for machines without TensorFlow. The tfdata source streams instead, for
data that do not fit.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from resunet_jax import inputs, parallel


def training_arrays(slices: dict, config) -> dict:
    """The device-resident form of the training patients' slices.

    Args:
        slices: the training patients' resized slices (`data.arrays.load`):
            {"image": [M, S, S, 3] uint8, "mask": [M, S, S, 1] uint8,
            "patient_id": [M] str, "slice_index": [M] int, ...}.
        config: run config (data.context_slices, data.normalization, data.tumor_fraction).

    Returns:
        {"image": [M, S, S, 3] uint8, "mask": [M, S, S, 1] uint8, "context": [M, 2k + 1]
        int32 rows of each slice's 2.5-D input, "tumor": [T] int32 and "clean": [M - T]
        int32 the slices with and without tumour (with tumor_fraction None, "tumor"
        holds every slice), and for "volume" normalisation "norm": [M, 2, 3]}.
    """
    patients, positions = slices["patient_id"], slices["slice_index"]
    out = {"image": slices["image"], "mask": slices["mask"]}
    rows = inputs.neighbours(patients, positions, config.data.context_slices)
    out["context"] = rows.astype(np.int32)
    has_tumor = out["mask"].any(axis=(1, 2, 3))
    if config.data.tumor_fraction is not None and has_tumor.all() != has_tumor.any():
        out["tumor"] = np.flatnonzero(has_tumor).astype(np.int32)
        out["clean"] = np.flatnonzero(~has_tumor).astype(np.int32)
    else:
        if config.data.tumor_fraction is not None:
            logging.warning(
                "Training slices are all %s: data.tumor_fraction ignored",
                "with tumour" if has_tumor.any() else "without tumour",
            )
        out["tumor"] = np.arange(len(has_tumor), dtype=np.int32)
        out["clean"] = out["tumor"][:0]
    if config.data.normalization == "volume":
        out["norm"] = inputs.volume_statistics(out["image"], patients)
    return out


def put(arrays: dict):
    """A copy of `arrays` on every local device, laid out [local_devices, ...] as the
    pmap-ed step takes its batch argument."""
    devices = jax.local_device_count()
    return parallel.shard_batch(
        {k: np.broadcast_to(v, (devices, *v.shape)) for k, v in arrays.items()}
    )


def sample(keys, data: dict, tumor_fraction: float | None) -> dict:
    """Draws one batch from the resident slices, inside the step.

    Args:
        keys: [b] PRNG keys, one per example (`augment.example_keys`).
        data: this device's `training_arrays`.
        tumor_fraction: `data.tumor_fraction`: the chance an example is a tumour slice;
            None = uniform over all slices.

    Returns:
        {"image": [b, S, S, 3(2k + 1)] uint8, "mask": [b, S, S, 1] uint8, and "norm":
        [b, 2, 3] when `data` has it}.
    """

    def one(key):
        k_kind, k_tumor, k_clean = jax.random.split(key, 3)
        idx = data["tumor"][jax.random.randint(k_tumor, (), 0, data["tumor"].shape[0])]
        if tumor_fraction is not None and data["clean"].shape[0]:
            clean = data["clean"][jax.random.randint(k_clean, (), 0, data["clean"].shape[0])]
            idx = jnp.where(jax.random.uniform(k_kind) < tumor_fraction, idx, clean)
        example = {
            "image": inputs.stack_context(data["image"], data["context"][idx]),
            "mask": data["mask"][idx],
        }
        if "norm" in data:
            example["norm"] = data["norm"][idx]
        return example

    return jax.vmap(one)(keys)
