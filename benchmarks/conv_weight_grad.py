"""Weight gradient of the seed's 3x3 convolutions: XLA's vs GEMMs over row tiles.

Times, per layer shape of the seed ResUNet at 256x256 and batch 8, XLA's own weight
gradient (the vjp of `lax.conv_general_dilated`) against two hand-written forms that
loop (`lax.map`) over tiles of `th` image rows so that the operands stay in cache:
  shift:  nine matmuls of shifted input slices with the output gradient;
  im2col: one matmul of the tile's [pixels, 9 * C_in] patches with the output gradient.
Each is checked against XLA's result first. Prints one line per layer and the totals.

    python benchmarks/conv_weight_grad.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# (side, C_in, C_out) of the seed's 3x3 convolutions at 256x256 input.
LAYERS = [
    (256, 3, 16), (256, 16, 16), (128, 16, 32), (128, 32, 32), (64, 32, 64),
    (64, 64, 64), (32, 64, 128), (32, 128, 128), (16, 128, 256), (16, 256, 256),
]  # fmt: skip


def conv(x, w):
    return lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _tiles(x, dy, th, tile_fn):
    """Sums tile_fn(input rows with a 1-pixel halo, output-gradient rows) over row tiles."""
    n, h, w, ci = x.shape
    co = dy.shape[-1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

    def one(t):
        xs = lax.dynamic_slice(xp, (0, t * th, 0, 0), (n, th + 2, w + 2, ci))
        ds = lax.dynamic_slice(dy, (0, t * th, 0, 0), (n, th, w, co))
        shifted = [xs[:, i : i + th, j : j + w] for i in range(3) for j in range(3)]
        return tile_fn(shifted, ds)

    return lax.map(one, jnp.arange(h // th)).sum(0).reshape(3, 3, ci, co)


def dw_shift(x, dy, th):
    return _tiles(
        x, dy, th, lambda xs, ds: jnp.stack([jnp.einsum("nhwc,nhwd->cd", s, ds) for s in xs])
    )


def dw_im2col(x, dy, th):
    def gemm(xs, ds):
        patches = jnp.concatenate(xs, -1)
        return patches.reshape(-1, patches.shape[-1]).T @ ds.reshape(-1, ds.shape[-1])

    return _tiles(x, dy, th, gemm)


def median_ms(fn, *args, n=7):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main():
    rng = np.random.default_rng(0)
    totals = {}
    for side, ci, co in LAYERS:
        x = jnp.asarray(rng.random((8, side, side, ci)), jnp.float32)
        w = jnp.asarray(rng.random((3, 3, ci, co)) * 0.1, jnp.float32)
        dy = jnp.asarray(rng.random((8, side, side, co)), jnp.float32)
        xla = jax.jit(lambda x, dy, w=w: jax.vjp(conv, x, w)[1](dy)[1])
        reference = xla(x, dy)
        row = {"xla": median_ms(xla, x, dy)}
        for th in (4, 16):
            for name, f in (("shift", dw_shift), ("im2col", dw_im2col)):
                fn = jax.jit(lambda x, dy, f=f, th=th: f(x, dy, th))
                err = float(jnp.abs(fn(x, dy) - reference).max() / jnp.abs(reference).max())
                assert err < 1e-4, (name, th, err)
                row[f"{name}{th}"] = median_ms(fn, x, dy)
        for k, v in row.items():
            totals[k] = totals.get(k, 0.0) + v
        print(side, ci, co, "  ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    print("total ms", "  ".join(f"{k} {v:.1f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
