"""The training augmentation, in JAX: drawn per example, applied inside the train step.

Both batch sources hand the train step uint8 slices; each device augments its share
(`augment_batch`) in the same compiled step that trains on it, so the host only moves
bytes. Each example's draws come from its own key (`example_keys`: the step's key
folded with the example's index in the global batch), so a batch is a pure function of
the seed and the step, whatever the number of devices or hosts.

Per example, in this order: missing sequences (a sequence replaced by the FLAIR),
flip + rotation + zoom as one bilinear warp of image and mask together (zeros outside),
per-sequence gain and gamma, then the model's normalisation: the augmentation is the `transform` of
`inputs.model_input`, the one way a slice becomes model input.
"""

import math

import jax
import jax.numpy as jnp

from resunet_jax import inputs


def example_keys(key, per_device: int, axis_name: str | None, processes: int = 1):
    """One key per example of this device's share of the global batch.

    Args:
        key: the step's PRNG key (the same on every device).
        per_device: examples per device b.
        axis_name: the pmap axis; None = a single device.
        processes: P > 1 when each of P processes batched every P-th element of one
            stream (the tfdata source's shard): the example's index is then its place in
            that stream, so that P processes draw what one process would.

    Returns:
        [b] keys: `key` folded with the example's index in the global batch.
    """
    device = jax.lax.axis_index(axis_name) if axis_name else 0
    row = jnp.arange(per_device)
    if processes == 1:
        index = device * per_device + row
    else:
        local = jax.local_device_count()
        # Device d of process p holds rows d*b .. d*b + b-1 of p's batch: the stream's
        # elements row * P + p (devices are numbered process by process).
        index = ((device % local) * per_device + row) * processes + device // local
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def draw(key, config) -> dict:
    """One example's augmentation, a pure function of `key`.

    Args:
        key: PRNG key.
        config: `config.augment` (flip, rotate_degrees, scale, intensity, gamma,
            missing_sequences).

    Returns:
        {"flip": [] +-1.0 (left-right mirror when -1), "angle": [] radians uniform in
        +-rotate_degrees, "zoom": [] uniform in 1 +- scale, "gain": [3] per-sequence
        gain uniform in 1 +- intensity, "gamma": [3] per-sequence gamma, log-uniform
        in +-gamma, "missing": [2] bool, whether the pre- and the post-contrast are
        missing: with probability missing_sequences one of them or both (each case
        equally likely), else neither}.
    """
    k = jax.random.split(key, 7)
    flip = jnp.where(jax.random.uniform(k[0]) < 0.5, -1.0, 1.0) if config.flip else 1.0
    r, s, i, g = config.rotate_degrees, config.scale, config.intensity, config.gamma
    missing = jnp.zeros(2, bool)
    if config.missing_sequences:
        drop = jax.random.uniform(k[5]) < config.missing_sequences
        case = jax.random.randint(k[6], (), 0, 3)  # 0: pre, 1: post, 2: both
        missing = jnp.stack([drop & (case != 1), drop & (case != 0)])
    return {
        "flip": jnp.asarray(flip, jnp.float32),
        "angle": jax.random.uniform(k[1], minval=-r, maxval=r) * (math.pi / 180.0),
        "zoom": jax.random.uniform(k[2], minval=1.0 - s, maxval=1.0 + s),
        "gain": jax.random.uniform(k[3], (3,), minval=1.0 - i, maxval=1.0 + i),
        # Log-uniform, so brightening and darkening are equally likely.
        "gamma": jnp.exp(jax.random.uniform(k[4], (3,), minval=-g, maxval=g)),
        "missing": missing,
    }


def warp(image, flip, angle, zoom):
    """Flips, rotates and zooms an image about its centre: one bilinear resample.

    Output pixel p samples the input at c + R(angle) / zoom @ diag(flip, 1) @ (p - c),
    c the centre; samples outside the image read 0.

    Args:
        image: [S, S, C] float32.
        flip: +-1; angle: radians; zoom: > 0 (> 1 enlarges).

    Returns:
        [S, S, C] float32.
    """
    size = image.shape[0]
    c = (size - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(size) - c, jnp.arange(size) - c, indexing="ij")
    cos, sin = jnp.cos(angle) / zoom, jnp.sin(angle) / zoom
    src_x = c + cos * flip * xx - sin * yy
    src_y = c + sin * flip * xx + cos * yy
    x0, y0 = jnp.floor(src_x), jnp.floor(src_y)
    out = jnp.zeros_like(image)
    # The four neighbours, all channels gathered at once (one gather each).
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y, x = (y0 + dy).astype(jnp.int32), (x0 + dx).astype(jnp.int32)
        weight = (1.0 - jnp.abs(src_y - (y0 + dy))) * (1.0 - jnp.abs(src_x - (x0 + dx)))
        inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
        values = image[jnp.clip(y, 0, size - 1), jnp.clip(x, 0, size - 1)]
        out += jnp.where(inside, weight, 0.0)[..., None] * values
    return out


def augment(key, image, mask, config, normalization: str = "scale", stats=None) -> dict:
    """Augments and normalises one training example.

    Args:
        key: the example's PRNG key (`example_keys`).
        image: [S, S, 3n] uint8: n slices (2.5-D context) of pre-contrast, FLAIR,
            post-contrast.
        mask: [S, S, 1] uint8 in {0, 1}.
        config: `config.augment`.
        normalization: `data.normalization` (`inputs.normalize`).
        stats: "volume" normalisation: [2, 3] the slice's volume statistics.

    Returns:
        {"image": [S, S, 3n] float32 model input, "mask": [S, S, 1] uint8 in {0, 1}}.
    """
    p = draw(key, config)
    warped = {"mask": mask.astype(jnp.float32)}

    def transform(image):  # [S, S, 3n] float32 in [0, 255], missing sequences filled
        if config.flip or config.rotate_degrees or config.scale:
            # Image and mask in one resample, so they stay aligned.
            slices = jnp.concatenate([image, warped["mask"]], axis=-1)
            slices = warp(slices, p["flip"], p["angle"], p["zoom"])
            image, warped["mask"] = slices[..., :-1], slices[..., -1:]
        repeats = image.shape[-1] // 3  # one scanner: context slices share a sequence's draw
        image = jnp.clip(image * jnp.tile(p["gain"], repeats), 0.0, 255.0)
        if config.gamma:
            # 255 (x/255)^γ keeps black and white and moves the mid-tones, as contrast
            # changes between scanners; exp(γ log x) because XLA's CPU pow is slower.
            image = 255.0 * jnp.exp(jnp.tile(p["gamma"], repeats) * jnp.log(image / 255.0))
        return image

    missing = p["missing"] if config.missing_sequences else None
    image = inputs.model_input(image, stats, missing, normalization, transform)
    return {"image": image, "mask": (warped["mask"] >= 0.5).astype(jnp.uint8)}


def augment_batch(keys, batch: dict, config, normalization: str = "scale") -> dict:
    """`augment` over a batch.

    Args:
        keys: [b] PRNG keys.
        batch: {"image": [b, S, S, 3n] uint8, "mask": [b, S, S, 1] uint8, and for
            "volume" normalisation "norm": [b, 2, 3]}.
        config: `config.augment`.
        normalization: `data.normalization`.

    Returns:
        {"image": [b, S, S, 3n] float32, "mask": [b, S, S, 1] uint8}.
    """

    def one(key, image, mask, stats):
        return augment(key, image, mask, config, normalization, stats)

    return jax.vmap(one)(keys, batch["image"], batch["mask"], batch.get("norm"))
