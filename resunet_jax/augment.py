"""The training augmentation, in JAX: drawn per example, applied inside the train step.

Both batch sources hand the train step uint8 slices; each device augments its share
(`augment_batch`) in the same compiled step that trains on it, so the host only moves
bytes. Each example's draws come from its own key (`example_keys`: the step's key
folded with the example's index in the global batch), so a batch is a pure function of
the seed and the step, whatever the number of devices or hosts.

Per example, in this order: missing sequences (a sequence replaced by the FLAIR),
flip + rotation + zoom (+ field-of-view shift) as one bilinear warp of image and mask
together (zeros outside), thick-slice blur, bias field, intensity window, per-sequence
gain and gamma, skull stripping, then the model's normalisation: the augmentation is the
`transform` of `inputs.model_input`, the one way a slice becomes model input.

The scanner-domain keys (issue #47), all 0 = off, and off the pipeline computes exactly
what it did without them (same draws, same operations, bit for bit), so old configs and
checkpoints' configs (which lack them) behave as before. Their draws come from keys
folded off the example's key, so turning one on changes none of the other draws.

- `fov` (lowest zoom, e.g. 0.75): other fields of view and pixel sizes. The zoom is drawn
  log-uniform in [fov, 1 + scale] instead of uniform in 1 +- scale (a wider field of view
  or larger pixels show the head smaller in the frame), and the slice shifts by up to
  the margin the zoom frees plus 5% of the side, both axes.
- `blur` (probability): thick-slice / low-resolution blur, a separable Gaussian with a
  sigma per axis uniform in [0, 1.5] px at 128 px (scaled with the side), all channels.
- `bias_field` (strength b): a smooth multiplicative field exp(u b f(y, x)), f a random
  cubic polynomial in the coordinates scaled to max |f| = 1 over the slice, u uniform in
  [0, 1]: the slow intensity drift of receive coils (at most e^+-b), all channels alike.
- `window` (w): an intensity remap per sequence, x -> 255 (x - lo) / (hi - lo) clipped to
  [0, 255], lo uniform in +-w 255, hi in 255 (1 +- w): other windows / rescalings of the
  volume's range (contrast stretched and clipped, or compressed and offset).
- `skull_strip` (probability): a skull-stripped slice. The head is where the FLAIR
  exceeds a tenth of its maximum (at least 10 grey), holes filled (row- and
  column-wise spans), eroded by a random 4-10 px at 128 px (scaled with the side;
  chessboard erosion, iterated 3x3 min-pooling, `jax.lax.reduce_window`); every channel,
  and the mask, are set to 0 outside it.
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
            missing_sequences; the scanner-domain keys fov, blur, bias_field, window,
            skull_strip, absent = 0).

    Returns:
        {"flip": [] +-1.0 (left-right mirror when -1), "angle": [] radians uniform in
        +-rotate_degrees, "zoom": [] uniform in 1 +- scale, "gain": [3] per-sequence
        gain uniform in 1 +- intensity, "gamma": [3] per-sequence gamma, log-uniform
        in +-gamma, "missing": [2] bool, whether the pre- and the post-contrast are
        missing: with probability missing_sequences one of them or both (each case
        equally likely), else neither}; with the scanner-domain keys on also
        "shift": [2] px (fov; "zoom" then log-uniform in [fov, 1 + scale]), "blur": []
        bool and "sigma": [2] px (blur), "bias": [10] cubic coefficients times the
        strength (bias_field), "window": [3, 2] per-sequence (lo, hi) grey levels
        (window), "strip": [] bool and "erode": [] int px (skull_strip).
    """
    k = jax.random.split(key, 7)
    flip = jnp.where(jax.random.uniform(k[0]) < 0.5, -1.0, 1.0) if config.flip else 1.0
    r, s, i, g = config.rotate_degrees, config.scale, config.intensity, config.gamma
    missing = jnp.zeros(2, bool)
    if config.missing_sequences:
        drop = jax.random.uniform(k[5]) < config.missing_sequences
        case = jax.random.randint(k[6], (), 0, 3)  # 0: pre, 1: post, 2: both
        missing = jnp.stack([drop & (case != 1), drop & (case != 0)])
    p = {
        "flip": jnp.asarray(flip, jnp.float32),
        "angle": jax.random.uniform(k[1], minval=-r, maxval=r) * (math.pi / 180.0),
        "zoom": jax.random.uniform(k[2], minval=1.0 - s, maxval=1.0 + s),
        "gain": jax.random.uniform(k[3], (3,), minval=1.0 - i, maxval=1.0 + i),
        # Log-uniform, so brightening and darkening are equally likely.
        "gamma": jnp.exp(jax.random.uniform(k[4], (3,), minval=-g, maxval=g)),
        "missing": missing,
    }
    p.update(_draw_domain(key, config))
    return p


def _domain(config, name: str) -> float:
    """A scanner-domain key's value; configs from before these keys lack them (= off)."""
    return float(config.get(name, 0.0) or 0.0)


def _draw_domain(key, config) -> dict:
    """The scanner-domain draws (`draw`), from keys folded off `key` (the others' unchanged)."""
    k = [jax.random.fold_in(key, 1000 + j) for j in range(9)]
    p = {}
    fov = _domain(config, "fov")
    if fov:
        low, high = math.log(fov), math.log(1.0 + config.scale)
        zoom = jnp.exp(jax.random.uniform(k[0], minval=low, maxval=high))
        # Up to the margin the zoom frees (zoomed out) plus 5% of the side, as a fraction
        # of the side; `warp` scales it.
        room = jnp.maximum(0.0, 1.0 - zoom) / 2.0 + 0.05
        p["zoom"] = zoom
        p["shift"] = jax.random.uniform(k[1], (2,), minval=-1.0, maxval=1.0) * room
    blur = _domain(config, "blur")
    if blur:
        p["blur"] = jax.random.uniform(k[2]) < blur
        p["sigma"] = jax.random.uniform(k[3], (2,), minval=0.0, maxval=BLUR_SIGMA)
    bias = _domain(config, "bias_field")
    if bias:
        coefficients = jax.random.uniform(k[4], (len(_CUBIC),), minval=-1.0, maxval=1.0)
        p["bias"] = coefficients * bias * jax.random.uniform(k[5])
    w = _domain(config, "window")
    if w:
        edges = jax.random.uniform(k[6], (3, 2), minval=-w, maxval=w)
        p["window"] = 255.0 * (edges + jnp.array([0.0, 1.0]))
    strip = _domain(config, "skull_strip")
    if strip:
        p["strip"] = jax.random.uniform(k[7]) < strip
        p["erode"] = jax.random.randint(k[8], (), ERODE_PX[0], ERODE_PX[1] + 1)
    return p


BLUR_SIGMA = 1.5  # the largest thick-slice blur sigma, px at 128 px
ERODE_PX = (4, 10)  # skull stripping's erosion range, px at 128 px
# The cubic bias field's monomials y^a x^b, a + b <= 3, without the constant.
_CUBIC = tuple((a, b) for a in range(4) for b in range(4) if 0 < a + b <= 3)


def gaussian_blur(image, sigma):
    """A separable Gaussian blur, zero-padded edges renormalised (no dark rim).

    Args:
        image: [S, S, C] float32.
        sigma: [2] standard deviations in px along y and x (>= 0; 0 = none).

    Returns:
        [S, S, C] float32.
    """
    size = image.shape[0]
    d = jnp.arange(size, dtype=jnp.float32)
    d = (d[:, None] - d[None, :]) ** 2

    def kernel(s):  # [S, S] rows sum to 1
        k = jnp.exp(-d / (2.0 * jnp.maximum(s, 1e-3) ** 2))
        return k / k.sum(axis=1, keepdims=True)

    ky, kx = kernel(sigma[0]), kernel(sigma[1])
    hp = jax.lax.Precision.HIGHEST
    image = jnp.einsum("yi,ixc->yxc", ky, image, precision=hp)
    return jnp.einsum("xj,yjc->yxc", kx, image, precision=hp)


def bias_field(coefficients, size: int):
    """A smooth positive multiplicative field: exp of a cubic in the coordinates.

    Args:
        coefficients: [len(_CUBIC)] the monomials' weights; the polynomial is scaled to
            max |f| = max |coefficients| over the slice, so the field lies in
            [e^-m, e^m], m = max |coefficients|.
        size: the slice's side S.

    Returns:
        [S, S, 1] float32, > 0.
    """
    t = jnp.linspace(-1.0, 1.0, size)
    yy, xx = jnp.meshgrid(t, t, indexing="ij")
    f = sum(c * yy**a * xx**b for c, (a, b) in zip(coefficients, _CUBIC, strict=True))
    f = f / jnp.maximum(jnp.abs(f).max(), 1e-6) * jnp.abs(coefficients).max()
    return jnp.exp(f)[..., None]


def head_mask(flair):
    """Where the head is: the FLAIR over a tenth of its maximum (>= 10 grey), holes filled.

    Args:
        flair: [S, S] float32 in [0, 255].

    Returns:
        [S, S] bool: the pixels between a row's first and last head pixel that are also
        between their column's first and last (fills ventricles, dark lesions, gaps).
    """
    head = flair > jnp.maximum(10.0, 0.1 * flair.max())

    def span(m, axis):  # between the first and last True along axis
        forward = jnp.cumsum(m, axis=axis) > 0
        backward = jnp.flip(jnp.cumsum(jnp.flip(m, axis), axis=axis), axis) > 0
        return forward & backward

    return span(head, 0) & span(head, 1)


def erode(mask, radius, max_radius: int):
    """Chessboard erosion by a traced radius: pixels at least `radius` px inside `mask`.

    Iterated 3x3 min-pooling (`jax.lax.reduce_window`, beyond the frame counts as
    inside) counts each pixel's depth, up to `max_radius`.

    Args:
        mask: [S, S] bool.
        radius: [] int in [0, max_radius].
        max_radius: static bound.

    Returns:
        [S, S] bool.
    """
    m = mask.astype(jnp.float32)

    def step(_, carry):
        m, depth = carry
        m = jax.lax.reduce_window(m, jnp.inf, jax.lax.min, (3, 3), (1, 1), "SAME")
        return m, depth + m

    _, depth = jax.lax.fori_loop(0, max_radius, step, (m, jnp.zeros_like(m)))
    return (mask & (depth >= radius)).astype(bool)


def warp(image, flip, angle, zoom, shift=None):
    """Flips, rotates and zooms an image about its centre: one bilinear resample.

    Output pixel p samples the input at c + R(angle) / zoom @ diag(flip, 1) @ (p - c),
    c the centre (minus shift, the content moving by shift); samples outside the image
    read 0.

    Args:
        image: [S, S, C] float32.
        flip: +-1; angle: radians; zoom: > 0 (> 1 enlarges).
        shift: [2] (y, x) fractions of the side; None = none.

    Returns:
        [S, S, C] float32.
    """
    size = image.shape[0]
    c = (size - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(size) - c, jnp.arange(size) - c, indexing="ij")
    cos, sin = jnp.cos(angle) / zoom, jnp.sin(angle) / zoom
    src_x = c + cos * flip * xx - sin * yy
    src_y = c + sin * flip * xx + cos * yy
    if shift is not None:
        src_y, src_x = src_y - shift[0] * size, src_x - shift[1] * size
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
        size = image.shape[0]
        if config.flip or config.rotate_degrees or config.scale or "shift" in p:
            # Image and mask in one resample, so they stay aligned.
            slices = jnp.concatenate([image, warped["mask"]], axis=-1)
            slices = warp(slices, p["flip"], p["angle"], p["zoom"], p.get("shift"))
            image, warped["mask"] = slices[..., :-1], slices[..., -1:]
        repeats = image.shape[-1] // 3  # one scanner: context slices share a sequence's draw
        if "strip" in p:  # the head as acquired, before the intensity draws
            flair = image[..., 3 * (repeats // 2) + 1]
            radius = jnp.round(p["erode"] * size / 128.0).astype(jnp.int32)
            brain = erode(head_mask(flair), radius, math.ceil(ERODE_PX[1] * size / 128))
            brain = (brain | ~p["strip"])[..., None]
        if "blur" in p:
            sigma = p["sigma"] * (size / 128.0)
            image = jnp.where(p["blur"], gaussian_blur(image, sigma), image)
        if "bias" in p:
            image = image * bias_field(p["bias"], size)
        if "window" in p:
            lo, hi = jnp.tile(p["window"][:, 0], repeats), jnp.tile(p["window"][:, 1], repeats)
            image = 255.0 * (image - lo) / (hi - lo)
        if "bias" in p or "window" in p:
            image = jnp.clip(image, 0.0, 255.0)
        image = jnp.clip(image * jnp.tile(p["gain"], repeats), 0.0, 255.0)
        if config.gamma:
            # 255 (x/255)^γ keeps black and white and moves the mid-tones, as contrast
            # changes between scanners; exp(γ log x) because XLA's CPU pow is slower.
            image = 255.0 * jnp.exp(jnp.tile(p["gamma"], repeats) * jnp.log(image / 255.0))
        if "strip" in p:
            image = jnp.where(brain, image, 0.0)
            warped["mask"] = jnp.where(brain, warped["mask"], 0.0)
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
