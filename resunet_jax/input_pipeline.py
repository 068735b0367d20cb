"""tf.data input pipelines over prepared LGG data (the only module besides data/ using TF).

Train: patients → cache (resized uint8) → neighbouring slices as channels (2.5-D,
optional) → repeat → shuffle (or tumour-weighted sampling) → per-process shard → draw
each slice's augmentation → batch → augment and normalise the batch →
`[local_devices, per_device_batch, H, W, C]`.
Eval: every slice of the chosen patients once (TFDS order, not slice order: consumers
group by patient id and slice index), cached after resizing, in batches the evaluator
pads to the device count.
"""

import math

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from resunet_jax import context
from resunet_jax.data import lgg


def _select_patients(dataset: tf.data.Dataset, patient_ids) -> tf.data.Dataset:
    wanted = tf.constant(sorted(patient_ids))
    return dataset.filter(lambda ex: tf.reduce_any(tf.equal(ex["patient_id"], wanted)))


def resize_example(example, image_size: int, coverage: bool = False):
    """Resizes one decoded example to the model's input side.

    Args:
        example: {"image": [H, W, 3] uint8, "mask": [H, W, 1] uint8 in {0, 1}, ...}.
        image_size: output side S.
        coverage: also return each output pixel's tumour coverage (`data.soft_masks`).

    Returns:
        The example with image [S, S, 3] uint8 and mask [S, S, 1] uint8 in {0, 1},
        plus `orig_height`/`orig_width` (int32) to map predictions back, and with
        `coverage` a "coverage" [S, S, 1] uint8: the tumour's share of the pixel × 255.
    """
    shape = tf.shape(example["image"])
    image = tf.image.resize(example["image"], (image_size, image_size), antialias=True)
    # Area-resize then threshold keeps small lesions in proportion when shrinking.
    mask = tf.image.resize(tf.cast(example["mask"], tf.float32), (image_size, image_size), "area")
    out = dict(
        example,
        image=tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8),
        mask=tf.cast(mask >= 0.5, tf.uint8),
        orig_height=shape[0],
        orig_width=shape[1],
    )
    if coverage:
        out["coverage"] = tf.cast(tf.round(255.0 * tf.clip_by_value(mask, 0.0, 1.0)), tf.uint8)
    return out


NORMALIZATIONS = ("scale", "slice", "volume")  # config.data.normalization


def normalize(image, method: str = "scale", stats=None):
    """uint8 (or float in [0, 255]) [..., H, W, 3n] → float32 model input.

    "scale": x / 255. "slice": each channel of each slice standardised to zero mean,
    unit variance. "volume": each channel standardised by the mean and standard
    deviation of x over its patient's non-zero pixels (`volume_stats`), so a lesion
    is as bright as it is relative to that patient's scan, whatever the scanner's gain.

    Args:
        image: [..., H, W, 3n]: n slices' three channels (n > 1: `add_context`).
        method: `data.normalization`.
        stats: "volume" only: [..., 2, 3] per-channel (mean, std) of the image's volume.
    """
    image = tf.cast(image, tf.float32) / 255.0
    if method == "scale":
        return image
    if method == "slice":
        mean, var = tf.nn.moments(image, axes=[-3, -2], keepdims=True)
        return (image - mean) / tf.sqrt(var + 1e-4)
    if method == "volume":
        if stats is None:
            raise ValueError("data.normalization='volume' needs the volume's statistics")
        stats = tf.cast(stats, tf.float32)
        # Context slices (`add_context`) repeat the three channels: so do their stats.
        stats = tf.concat([stats] * (image.shape[-1] // 3), axis=-1)
        return (image - stats[..., 0:1, None, :]) / stats[..., 1:2, None, :]
    raise ValueError(f"unknown normalization {method!r}; use one of {NORMALIZATIONS}")


def slice_moments(image):
    """Moments of a slice's non-zero pixels, summed over slices into `volume_stats`.

    Counted are the pixels with any channel non-zero. The LGG slices are not
    skull-stripped and their background is dim noise, exactly 0 in only a few per cent
    of the pixels, so this is most of the field of view, background included; a fixed
    level such as `HEAD_LEVEL` would make the statistics change with the image's gain,
    which this normalisation is there to remove.

    Args:
        image: [..., H, W, 3] uint8 (or float in [0, 255]).

    Returns:
        [..., 3, 3] float32: rows (pixel count, sum of x, sum of x²), columns the
        channels, x = value / 255.
    """
    x = tf.cast(image, tf.float32) / 255.0
    nonzero = tf.cast(tf.reduce_any(x > 0, axis=-1, keepdims=True), tf.float32)
    count = tf.reduce_sum(nonzero, axis=[-3, -2]) * tf.ones_like(x[..., 0, 0, :])
    total = tf.reduce_sum(x * nonzero, axis=[-3, -2])
    squares = tf.reduce_sum(x * x * nonzero, axis=[-3, -2])
    return tf.stack([count, total, squares], axis=-2)


def volume_stats(moments) -> np.ndarray:
    """Per-channel mean and standard deviation of a volume's non-zero pixels.

    Args:
        moments: [3, 3] `slice_moments` summed over the volume's slices.

    Returns:
        [2, 3] float32 (mean, std) of x = value / 255; a volume without non-zero
        pixels gets (0, 1).
    """
    count, total, squares = np.asarray(moments, np.float64)
    if count[0] == 0:
        return np.array([[0.0] * 3, [1.0] * 3], np.float32)
    mean = total / count
    var = np.maximum(squares / count - mean**2, 0.0)
    # A floor far under any real volume's spread (dim LGG FLAIR volumes have std ~0.02):
    # a larger one would make dim volumes' inputs depend on their gain again.
    return np.stack([mean, np.sqrt(var + 1e-8)]).astype(np.float32)


def _add_volume_stats(ds: tf.data.Dataset, patient_ids) -> tf.data.Dataset:
    """Adds each example's patient's `volume_stats` as "norm" [2, 3].

    One pass over `ds` (resized slices, as prediction computes them) sums every
    patient's moments.
    """
    wanted = tf.constant(sorted(patient_ids))

    def index(ex):
        return tf.argmax(tf.cast(tf.equal(wanted, ex["patient_id"]), tf.int32))

    sums = np.zeros([len(patient_ids), 3, 3])
    pairs = ds.map(lambda ex: (index(ex), slice_moments(ex["image"])), tf.data.AUTOTUNE)
    for i, moments in pairs.as_numpy_iterator():
        sums[i] += moments
    table = tf.constant(np.stack([volume_stats(m) for m in sums]))
    return ds.map(lambda ex: dict(ex, norm=tf.gather(table, index(ex))))


def add_context(ds: tf.data.Dataset, k: int) -> tf.data.Dataset:
    """2.5-D input: each "image" [S, S, 3] becomes [S, S, 3(2k + 1)] (the layout of
    `context.stack_context`).

    One pass over `ds` (cached, in a fixed order, with "patient_id" and "slice_index")
    reads every slice; each element then gathers its neighbours (`context.context_rows`)
    by its position in that order.

    Args:
        ds: resized examples, the same order on every pass.
        k: `data.context_slices`; 0 returns `ds` unchanged.
    """
    if not k:
        return ds
    images, patients, positions = [], [], []
    keys = ds.map(lambda ex: (ex["image"], ex["patient_id"], ex["slice_index"]))
    for image, patient, position in keys.as_numpy_iterator():
        images.append(image)
        patients.append(patient)
        positions.append(position)
    if not images:
        return ds
    table = tf.constant(np.stack(images))
    rows = tf.constant(context.context_rows(patients, positions, k))

    def add(i, ex):
        stack = tf.transpose(tf.gather(table, rows[i]), [1, 2, 0, 3])  # [S, S, 2k+1, 3]
        return dict(ex, image=tf.reshape(stack, [*stack.shape[:2], -1]))

    return ds.enumerate().map(add, tf.data.AUTOTUNE)


# Control points per side of the elastic displacement field: coarse, so the field bends
# anatomy smoothly (a shift per ~1/4 of the slice) instead of jittering pixels.
ELASTIC_GRID = 5


# AutoGraph is off for augment_params and augment (and all they call): their branches
# are on config values, never on tensors, so converting them would only lengthen every
# training start (the dataset graph is the same op for op either way).
@tf.autograph.experimental.do_not_convert
def augment_params(seed, image_size: int, config, crop_size: int | None = None):
    """Draws one slice's augmentation: a pure function of `seed`.

    Flip, rotation and scaling about the centre and the crop are one projective
    transform, so the slice is resampled once (tf.raw_ops.ImageProjectiveTransformV3
    convention: the 8 parameters map output to input coordinates). An elastic
    deformation, when on, adds a smooth displacement to that mapping (same resample).

    Args:
        seed: [2] int stateless seed.
        image_size: slice side S.
        config: `config.augment` (flip, rotate_degrees, scale, intensity, gamma,
            elastic, blur, noise, missing_sequences, tumor_paste).
        crop_size: output side C <= S; the crop's centre is uniform over the positions
            that keep it inside the slice. None = S (no crop).

    Returns:
        {"transform": [8] float32, "gain": [3] float32 per-channel intensity gain,
        "gamma": [3] float32 per-channel gamma}, and with `elastic` > 0
        "displacement": [G, G, 2] float32, the (x, y) shifts in pixels at a G x G grid
        of control points (G = ELASTIC_GRID) spread over the output; with `blur` > 0
        "blur": [] float32 Gaussian σ in output pixels, uniform in [0, blur]; with
        `noise` > 0 "noise": [3] float32 per-channel noise std as a fraction of the
        slice's mean head intensity, uniform in [0, noise], and "noise_seed": [2] the
        seed of the noise field; with `missing_sequences` p > 0 "missing": [2] bool,
        whether the pre- and the post-contrast sequence are missing: with probability
        p one of them or both (each of the three cases equally likely), else neither;
        with `tumor_paste` p > 0 "paste": [] bool, true with probability p (see
        `paste_tumours`).
    """
    crop_size = crop_size or image_size
    seeds = tf.random.experimental.stateless_split(seed, 4)
    flip = 1.0
    if config.flip:
        flip = tf.where(tf.random.stateless_uniform([], seeds[0]) < 0.5, -1.0, 1.0)
    r, s, i = config.rotate_degrees, config.scale, config.intensity
    angle = tf.random.stateless_uniform([], seeds[1], -r, r) * (math.pi / 180.0)
    zoom = tf.random.stateless_uniform([], seeds[2], 1.0 - s, 1.0 + s)
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    # input = c + shift + R(angle)/zoom @ diag(flip, 1) @ (output - o), with c and o the
    # centres of the slice and of the output.
    a0, a1, b0, b1 = cos * flip, -sin, sin * flip, cos
    c, o = (image_size - 1) / 2.0, (crop_size - 1) / 2.0
    margin = (image_size - crop_size) / 2.0
    # A seed of its own keeps the other draws as they were before crops existed.
    crop_seed = tf.random.experimental.stateless_fold_in(seed, 4)
    dx, dy = tf.unstack(tf.random.stateless_uniform([2], crop_seed, -margin, margin))
    transform = tf.stack([a0, a1, c + dx - (a0 + a1) * o, b0, b1, c + dy - (b0 + b1) * o, 0.0, 0.0])
    gain = tf.random.stateless_uniform([3], seeds[3], 1.0 - i, 1.0 + i)
    # log-uniform, so brightening and darkening are equally likely.
    g = config.gamma
    gamma_seed = tf.random.experimental.stateless_fold_in(seed, 5)
    gamma = tf.exp(tf.random.stateless_uniform([3], gamma_seed, -g, g))
    params = {"transform": transform, "gain": gain, "gamma": gamma}
    elastic = config.get("elastic", 0.0)
    if elastic:
        elastic_seed = tf.random.experimental.stateless_fold_in(seed, 6)
        shape = [ELASTIC_GRID, ELASTIC_GRID, 2]
        params["displacement"] = tf.random.stateless_normal(shape, elastic_seed) * (
            elastic * crop_size
        )
    blur = config.get("blur", 0.0)
    if blur:
        blur_seed = tf.random.experimental.stateless_fold_in(seed, 7)
        params["blur"] = tf.random.stateless_uniform([], blur_seed, 0.0, blur)
    noise = config.get("noise", 0.0)
    if noise:
        noise_seed = tf.random.experimental.stateless_fold_in(seed, 8)
        params["noise"] = tf.random.stateless_uniform([3], noise_seed, 0.0, noise)
        params["noise_seed"] = tf.random.experimental.stateless_fold_in(seed, 9)
    missing = config.get("missing_sequences", 0.0)
    if missing:
        u = tf.random.stateless_uniform([2], tf.random.experimental.stateless_fold_in(seed, 10))
        case = tf.cast(tf.floor(u[1] * 3.0), tf.int32)  # 0: pre, 1: post, 2: both
        drop = u[0] < missing
        params["missing"] = tf.stack([drop & (case != 1), drop & (case != 0)])
    paste = config.get("tumor_paste", 0.0)
    if paste:
        u = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 11))
        params["paste"] = u < paste
    return params


def drop_sequences(image, missing):
    """Fills missing sequences with the FLAIR, as the LGG data do where one was not acquired.

    Args:
        image: [..., S, S, 3n] (n slices of pre-contrast, FLAIR, post-contrast).
        missing: [..., 2] bool (the leading dimensions of `image`'s): pre-contrast and
            post-contrast missing.

    Returns:
        `image` with each missing sequence's channels replaced by the FLAIR's.
    """
    shape = tf.shape(image)
    slices = tf.reshape(image, tf.concat([shape[:-1], [image.shape[-1] // 3, 3]], 0))
    flair = slices[..., 1]
    pre = tf.where(missing[..., None, None, :1], flair, slices[..., 0])
    post = tf.where(missing[..., None, None, 1:], flair, slices[..., 2])
    return tf.reshape(tf.stack([pre, flair, post], -1), shape)


# `eval.missing_sequences` -> which of (pre-contrast, post-contrast) are missing.
MISSING_SEQUENCES = {
    "": (False, False),
    "pre": (True, False),
    "post": (False, True),
    "both": (True, True),
}


# The LGG slices are not skull-stripped and their background is noise of up to ~10 grey
# levels, so "any channel > 0" is most of the field of view; above this level only a
# little dark CSF is lost from the head and little background is kept.
HEAD_LEVEL = 10.0


def _head_mask(images):
    """[B, H, W, C] intensities (0-255) -> [B, H, W, 1] float32, 1 on the head.

    The head is where any channel exceeds `HEAD_LEVEL`.
    """
    return tf.cast(tf.reduce_max(images, axis=-1, keepdims=True) > HEAD_LEVEL, tf.float32)


def paste_tumours(slices, paste):
    """Pastes each slice's tumour into the slice before it in the batch (TumorCP).

    Copy-paste augmentation (Ghiasi et al. 2021; for tumours, Yang et al. 2021): a
    receiving slice gets the donor's pixels under the donor's mask, where the receiver
    has head (`_head_mask`), and the union of both masks. The slices of a batch are already warped
    apart and come from different patients most of the time, so a lesion is shown in
    another brain, at another place, next to other tissue.

    Args:
        slices: [B, S, S, 3n + 1] float32: image channels (0-255) and the mask (or
            tumour share) in [0, 1], as `augment` resamples them.
        paste: [B] bool, whether slice i receives slice (i + 1) mod B's tumour.

    Returns:
        [B, S, S, 3n + 1] float32; slices with `paste` false (and donors without
        tumour) unchanged.
    """
    donor = tf.roll(slices, shift=-1, axis=0)
    image, mask = slices[..., :-1], slices[..., -1:]
    head = _head_mask(image)
    # The donor mask's resampled values blend the edge over about a pixel.
    alpha = donor[..., -1:] * head * tf.cast(paste, tf.float32)[:, None, None, None]
    image = image * (1.0 - alpha) + donor[..., :-1] * alpha
    return tf.concat([image, tf.maximum(mask, alpha)], -1)


def warp_bilinear(images, transforms, out_size: int | None = None, displacements=None):
    """Resamples each image at its projective transform, bilinearly, zeros outside.

    The convention of tf.raw_ops.ImageProjectiveTransformV3 (output (x, y) samples
    input (a0 x + a1 y + a2, b0 x + b1 y + b2)); written as gathers because compiled
    with XLA they run faster on CPU than that op (benchmarks/README.md).

    Args:
        images: [B, S, S, C] float32.
        transforms: [B, 8] float32 (the last two, projective, must be 0).
        out_size: output side O; None = S.
        displacements: None, or [B, G, G, 2] float32 (x, y) input-pixel shifts at a
            G x G grid over the output, interpolated bilinearly to every output pixel
            and added to the transform's sampling positions (elastic deformation).

    Returns:
        [B, O, O, C] float32.
    """
    size = images.shape[1]
    grid = tf.range(out_size or size, dtype=tf.float32)
    yy, xx = tf.meshgrid(grid, grid, indexing="ij")
    t = transforms[:, :, None, None]
    src_x = t[:, 0] * xx + t[:, 1] * yy + t[:, 2]
    src_y = t[:, 3] * xx + t[:, 4] * yy + t[:, 5]
    if displacements is not None:
        field = tf.image.resize(displacements, (out_size or size, out_size or size))
        src_x, src_y = src_x + field[..., 0], src_y + field[..., 1]
    x0, y0 = tf.floor(src_x), tf.floor(src_y)
    wx, wy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    # A one-pixel zero border: indices clamped into it read zeros.
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]])

    def at(y, x):
        y = tf.clip_by_value(tf.cast(y, tf.int32) + 1, 0, size + 1)
        x = tf.clip_by_value(tf.cast(x, tf.int32) + 1, 0, size + 1)
        return tf.gather_nd(padded, tf.stack([y, x], -1), batch_dims=1)

    top = at(y0, x0) * (1 - wx) + at(y0, x0 + 1) * wx
    bottom = at(y0 + 1, x0) * (1 - wx) + at(y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bottom * wy


def gaussian_blur(images, sigma, radius: int):
    """Blurs each image with its own isotropic Gaussian (separable, edges mirrored).

    Args:
        images: [B, H, W, C] float32.
        sigma: [B] float32 standard deviations in pixels; 0 leaves an image unchanged.
        radius: kernel half-width (static); about 2 σ keeps 95% of the kernel's mass.

    Returns:
        [B, H, W, C] float32.
    """
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    # σ -> 0 makes the kernel a unit impulse (exp(-k²/2σ²) underflows to 0 for k != 0).
    s = tf.maximum(sigma, 1e-3)[:, None]
    w = tf.exp(-(offsets**2) / (2.0 * s**2))
    w = (w / tf.reduce_sum(w, axis=1, keepdims=True))[:, None, None, None, :]
    height, width = images.shape[1], images.shape[2]
    pad = [[0, 0], [radius, radius], [radius, radius], [0, 0]]
    padded = tf.pad(images, pad, mode="SYMMETRIC")
    rows = sum(
        w[..., k] * padded[:, :, k : k + width] for k in range(2 * radius + 1)
    )  # [B, H + 2r, W, C]
    return sum(w[..., k] * rows[:, k : k + height] for k in range(2 * radius + 1))


def add_noise(images, fraction, seed):
    """Adds Gaussian noise inside the head, scaled to each slice's own brightness.

    Args:
        images: [B, H, W, C] float32 intensities (0 = background).
        fraction: [B, C] noise std as a fraction of the slice channel's mean intensity
            over the head (`_head_mask`).
        seed: [2] int stateless seed of the noise field.

    Returns:
        [B, H, W, C] float32; pixels off the head (the scan's own background noise, the
        warp's zero padding) stay as they are.
    """
    head = _head_mask(images)
    area = tf.maximum(tf.reduce_sum(head, axis=(1, 2)), 1.0)  # [B, 1]
    mean = tf.reduce_sum(images * head, axis=(1, 2)) / area  # [B, C]
    std = (fraction * mean)[:, None, None, :]
    return images + std * head * tf.random.stateless_normal(tf.shape(images), seed)


def _finish(
    slices,
    gain,
    normalization: str,
    gamma=None,
    stats=None,
    blur=None,
    noise=None,
    noise_seed=None,
    blur_radius: int = 0,
    soft_mask: bool = False,
):
    """[B, S, S, 3n + 1] float (n slices' image channels, mask) → (blurred, noisy),
    gained (and gamma-corrected), normalised image (`stats` [B, 2, 3]: "volume"
    statistics); the mask binary, or with `soft_mask` the resampled values as they are.

    The [B, 3] gains, gammas and noise levels act on every context slice's channels
    alike: the slices of one volume share a scanner's contrast."""
    repeats = (slices.shape[-1] - 1) // 3
    image = slices[..., :-1]
    # Blur and noise first, as a scanner's resolution and noise come before any
    # contrast change (nnU-Net's order).
    if blur is not None:
        image = gaussian_blur(image, blur, blur_radius)
    if noise is not None:
        # One [B, ...] field per batch, from its first slice's seed: still a pure
        # function of the drawn seeds, and different for every slice and channel.
        image = add_noise(image, tf.concat([noise] * repeats, axis=-1), noise_seed[0])
    gain = tf.concat([gain] * repeats, axis=-1)
    image = tf.clip_by_value(image * gain[:, None, None, :], 0.0, 255.0)
    if gamma is not None:
        gamma = tf.concat([gamma] * repeats, axis=-1)
        # 255 (x/255)^γ keeps black and white and moves the mid-tones: contrast
        # between tissues changes as it does between scanners and protocols. Written
        # as exp(γ log x) because XLA's CPU pow is several times slower; log 0 = -inf
        # maps black to exactly 0.
        image = 255.0 * tf.exp(gamma[:, None, None, :] * tf.math.log(image / 255.0))
    return {
        "image": normalize(image, normalization, stats),
        "mask": slices[..., -1:] if soft_mask else tf.cast(slices[..., -1:] >= 0.5, tf.uint8),
    }


# Compiled with XLA, as two functions: XLA's CPU gather is fast for 4 floats per pixel
# but slow when the image/mask channel split is fused into it.
_warp_xla = tf.function(warp_bilinear, jit_compile=True, autograph=False)
_finish_xla = tf.function(_finish, jit_compile=True, autograph=False)


@tf.autograph.experimental.do_not_convert
def augment(batch, params, config, normalization: str = "scale", crop_size: int | None = None):
    """Applies drawn augmentations (`augment_params`) to a batch and normalises it.

    Image and mask are resampled together, bilinearly (the mask thresholded at half),
    so they stay aligned and the mask binary. A batch with "coverage" (`data.soft_masks`)
    has that resampled instead, and its mask is the tumour's share of each pixel.

    Args:
        batch: {"image": [B, S, S, 3n] uint8 (n = 2 data.context_slices + 1), "mask":
            [B, S, S, 1] uint8 in {0, 1}, optionally "coverage": [B, S, S, 1] uint8 (share
            × 255; `resize_example`), and
            for "volume" normalisation "norm": [B, 2, 3] the slices' volume statistics}.
        params: {"transform": [B, 8], "gain": [B, 3], "gamma": [B, 3] and optionally
            "displacement": [B, G, G, 2], "blur": [B], "noise": [B, 3], "noise_seed":
            [B, 2], "missing": [B, 2], "paste": [B]} (`augment_params`, batched).
        config: `config.augment` (geometry off: the warp is skipped).
        normalization: `data.normalization` (see `normalize`).
        crop_size: output side C, as given to `augment_params`; None = S.

    Returns:
        {"image": [B, C, C, 3n] float32 model input, "mask": [B, C, C, 1] uint8, or
        float32 in [0, 1] from "coverage"}.
    """
    soft = "coverage" in batch
    target = tf.cast(batch["coverage" if soft else "mask"], tf.float32)
    if soft:  # tumour share x 255 -> share
        target /= 255.0
    image, stats = batch["image"], batch.get("norm")
    if "missing" in params:
        image = drop_sequences(image, params["missing"])
        if stats is not None:  # [B, 2, 3] mean and std per sequence: FLAIR's for both
            stats = drop_sequences(stats[:, None], params["missing"])[:, 0]
    slices = tf.concat([tf.cast(image, tf.float32), target], -1)
    displacement = params.get("displacement")
    if (
        config.flip
        or config.rotate_degrees
        or config.scale
        or crop_size
        or displacement is not None
    ):
        slices = _warp_xla(slices, params["transform"], crop_size, displacement)
    if "paste" in params:
        slices = paste_tumours(slices, params["paste"])
    # With intensity 0 the drawn gains are exactly 1 (see augment_params).
    gamma = params["gamma"] if config.gamma else None
    blur = config.get("blur", 0.0)
    return _finish_xla(
        slices,
        params["gain"],
        normalization,
        gamma,
        stats,
        params.get("blur"),
        params.get("noise"),
        params.get("noise_seed"),
        # Two σ of the widest kernel drawn, so every kernel keeps >= 95% of its mass.
        max(1, math.ceil(2 * blur)),
        soft,
    )


def _weight_by_area(ds, weight: float, mean_area: float, max_area: float, seed: int):
    """Rejection-samples tumour slices so that each is drawn ∝ 1 + weight · area / mean area.

    Buda et al. draw a slice with probability proportional to its tumour area plus a
    uniform part; `weight` sets how much of it is the area (0: uniform).
    """
    top = 1.0 + weight * max_area / mean_area
    uniforms = tf.data.Dataset.random(seed=seed + 3).map(
        lambda r: tf.cast(r % (1 << 24), tf.float32) / float(1 << 24)
    )

    def keep(ex, u):
        area = tf.reduce_sum(tf.cast(ex["mask"], tf.float32))
        return u * top < 1.0 + weight * area / mean_area

    return tf.data.Dataset.zip(ds, uniforms).filter(keep).map(lambda ex, _: ex)


def create_train_dataset(
    builder, patient_ids, config, per_process_batch: int, seed: int
) -> tf.data.Dataset:
    """Endless, shuffled, augmented training batches of this process.

    With `data.tumor_fraction` set, slices with and without tumour are drawn at that
    rate; None keeps their natural proportion. With `data.tumor_area_weight` w > 0 as
    well, a tumour slice is drawn with probability ∝ 1 + w · area / mean area.

    Args:
        builder: prepared `LggBuilder`.
        patient_ids: training patients.
        config: the run config (uses data.*, augment.*).
        per_process_batch: batch size of this process (global batch / process count).
        seed: shuffling and augmentation seed; the stream is a pure function of it.

    Returns:
        Dataset of {"image": float32 [D, b, C, C, 3n], "mask": uint8 [D, b, C, C, 1]
        (float32 tumour share of each pixel with `data.soft_masks`)}, D = local devices,
        b = per_process_batch / D, C = data.crop_size (else S), n = 2 data.context_slices + 1.
    """
    devices = jax.local_device_count()
    if per_process_batch % devices:
        raise ValueError(
            f"batch_size per process ({per_process_batch}) must be divisible by the "
            f"{devices} local devices"
        )
    ds = _select_patients(builder.as_dataset(split=lgg.SPLIT, shuffle_files=False), patient_ids)
    soft = config.data.soft_masks
    ds = ds.map(lambda ex: resize_example(ex, config.data.image_size, soft), tf.data.AUTOTUNE)
    keep = ("image", "mask", "patient_id", "slice_index") + (("coverage",) if soft else ())
    ds = ds.map(lambda ex: {k: ex[k] for k in keep}).cache()
    if config.data.normalization == "volume":
        ds = _add_volume_stats(ds, patient_ids)
    ds = add_context(ds, config.data.context_slices)
    ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k not in ("patient_id", "slice_index")})
    fraction = config.data.tumor_fraction
    if fraction is not None:
        # Both kinds must exist, else sampling from an empty stream would never return.
        # This pass also fills the cache. Per kind: count, summed and largest tumour area.
        def tally(stats, ex):
            area = tf.reduce_sum(tf.cast(ex["mask"], tf.float32))
            kind = tf.one_hot(tf.cast(area > 0, tf.int32), 2)
            return tf.stack(
                [stats[0] + kind, stats[1] + kind * area, tf.maximum(stats[2], kind * area)]
            )

        stats = ds.reduce(tf.zeros([3, 2]), tally).numpy()
        kinds = stats[0]
        if not kinds.all():
            logging.warning(
                "Training slices are all %s: data.tumor_fraction ignored",
                "with tumour" if kinds[1] else "without tumour",
            )
            fraction = None
    if fraction is None:
        ds = ds.repeat().shuffle(config.data.shuffle_buffer, seed=seed)
    else:
        # Tumour slices are ~35% of the data; sampling them at a set rate shows the
        # model more lesion boundaries per step (Buda et al. weight by tumour area).
        def stream(has_tumor: bool, offset: int):
            part = ds.filter(lambda ex: tf.reduce_any(ex["mask"] > 0) == has_tumor)
            part = part.repeat().shuffle(config.data.shuffle_buffer, seed=seed + offset)
            weight = config.data.tumor_area_weight
            if has_tumor and weight:
                part = _weight_by_area(part, weight, stats[1, 1] / kinds[1], stats[2, 1], seed)
            return part

        ds = tf.data.Dataset.sample_from_datasets(
            [stream(True, 1), stream(False, 2)], [fraction, 1.0 - fraction], seed=seed
        )
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds)
    # Every process walks the same seeded stream and keeps every P-th element, so the P
    # per-process batches of a step together hold exactly the global batch a single
    # process would draw: training is the same on 1 or many hosts. Augmentation runs
    # after the shard, on this process's elements only.
    ds = ds.shard(jax.process_count(), jax.process_index())
    size, crop, aug = config.data.image_size, config.data.crop_size, config.augment
    ds = ds.map(lambda ex, s: (ex, augment_params(s, size, aug, crop)), tf.data.AUTOTUNE)
    ds = ds.batch(per_process_batch, drop_remainder=True)
    # Whole batches are resampled and normalised at once: one kernel call per batch
    # instead of per slice is what lets two cores feed a GPU.
    per_device = per_process_batch // devices

    def finish(batch, params):
        batch = augment(batch, params, aug, config.data.normalization, crop)
        return tf.nest.map_structure(
            lambda x: tf.reshape(x, [devices, per_device, *x.shape[1:]]), batch
        )

    ds = ds.map(finish, tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def create_eval_dataset(builder, patient_ids, config, batch_size: int) -> tf.data.Dataset:
    """Every slice of `patient_ids` once, cached after resizing.

    With `eval.missing_sequences` set, the named sequences are replaced by the FLAIR
    (`drop_sequences`): how the model fares on a patient without them.

    Returns:
        Dataset of {"image": float32 [b, S, S, 3n] (n = 2 data.context_slices + 1),
        "mask": uint8 [b, S, S, 1],
        "display": uint8 [b, S, S, 3] (the resized slice before normalisation),
        "original_mask": uint8 [b, H, W, 1] (the mask as read; slices smaller than the
        batch's largest are zero-padded right and below), "patient_id": string [b],
        "slice_index": int32 [b], "orig_height"/"orig_width"}, b <= batch_size (the
        last batch may be short).
    """
    ds = _select_patients(builder.as_dataset(split=lgg.SPLIT, shuffle_files=False), patient_ids)
    ds = ds.map(
        lambda ex: resize_example(dict(ex, original_mask=ex["mask"]), config.data.image_size),
        tf.data.AUTOTUNE,
    )
    ds = ds.cache()
    if config.data.normalization == "volume":
        ds = _add_volume_stats(ds, patient_ids)
    ds = add_context(ds.map(lambda ex: dict(ex, display=ex["image"])), config.data.context_slices)
    missing = config.eval.missing_sequences
    if missing:
        ds = ds.map(lambda ex: _drop_example_sequences(ex, MISSING_SEQUENCES[missing]))
    ds = ds.map(
        lambda ex: dict(
            ex, image=normalize(ex["image"], config.data.normalization, ex.get("norm"))
        ),
        tf.data.AUTOTUNE,
    )
    return ds.padded_batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _drop_example_sequences(ex, missing):
    """`drop_sequences` on one example (and its volume statistics, if any)."""
    missing = tf.constant(missing)
    ex = dict(ex, image=drop_sequences(ex["image"], missing))
    if "norm" in ex:  # [2, 3] mean and std per sequence: FLAIR's for the missing ones
        ex["norm"] = drop_sequences(ex["norm"][None], missing)[0]
    return ex


def as_numpy(ds: tf.data.Dataset):
    """Iterates a dataset as numpy trees (patient ids as str)."""
    for batch in ds.as_numpy_iterator():
        if "patient_id" in batch:
            batch["patient_id"] = np.array([p.decode() for p in batch["patient_id"]])
        yield batch
