"""2.5-D input: each slice with its neighbours along the volume's axis, as channels.

A tumour's extent along the axis tells a lesion margin from a vessel or artefact that a
single slice cannot. Pure numpy (jax.numpy arrays work too), so both batch sources,
evaluation and prediction share one definition.
"""

import numpy as np


def context_rows(patients, positions, k: int) -> np.ndarray:
    """Which slices make up each slice's input: itself and k neighbours per side.

    Neighbours are the adjacent slices of the same patient in slice order; beyond the
    first or last slice the end slice repeats, so every slice gets 2k + 1.

    Args:
        patients: [N] the slices' patient keys, in any order.
        positions: [N] the slices' positions along the axis (slice index).
        k: neighbours per side (`data.context_slices`).

    Returns:
        [N, 2k + 1] int64 rows into the N slices, offsets -k..k (column k is the slice).
    """
    patients, positions = np.asarray(patients), np.asarray(positions)
    rows = np.empty([len(patients), 2 * k + 1], np.int64)
    for patient in np.unique(patients):
        members = np.flatnonzero(patients == patient)
        members = members[np.argsort(positions[members], kind="stable")]
        at = np.arange(len(members))
        for offset in range(-k, k + 1):
            rows[members, offset + k] = members[np.clip(at + offset, 0, len(members) - 1)]
    return rows


def stack_context(images, rows):
    """Gathers each slice's context into channels (numpy or jax.numpy arrays).

    Args:
        images: [N, S, S, 3] the slices.
        rows: [..., 2k + 1] `context_rows`.

    Returns:
        [..., S, S, 3(2k + 1)]: slice -k's three channels first, the slice's own in the
        middle (channels 3k..3k+2).
    """
    stack = images[rows]  # [..., 2k+1, S, S, 3]
    stack = stack.swapaxes(-4, -3).swapaxes(-3, -2)  # [..., S, S, 2k+1, 3]
    return stack.reshape(*stack.shape[:-2], -1)
