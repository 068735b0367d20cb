import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resunet_jax import models


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_seed_resunet_has_the_keras_parameter_count():
    shapes = jax.eval_shape(
        lambda: models.ResUNet().init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    )
    assert _count(shapes["params"]) == 1_206_129
    assert _count(shapes["batch_stats"]) == 4_384


def test_output_is_one_logit_per_pixel_in_float32_also_in_bf16():
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    for dtype in (jnp.float32, jnp.bfloat16):
        model = models.ResUNet(
            stem_features=4, features=(8, 16), bottleneck_features=16, dtype=dtype
        )
        variables = model.init(jax.random.key(0), x)
        assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
        out = model.apply(variables, x)
        assert out["mask"].shape == (2, 32, 32, 1) and out["mask"].dtype == jnp.float32
        # Without a head, a slice's tumour logit is its largest pixel logit.
        np.testing.assert_allclose(out["tumor"], out["mask"].max(axis=(1, 2, 3)))


def test_detection_head_scores_each_slice():
    model = models.ResUNet(
        stem_features=4, features=(8,), bottleneck_features=8, detection_head=True
    )
    x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    assert variables["params"]["detection_head"]["kernel"].shape == (16, 1)  # mean+max pool
    out = model.apply(variables, x)
    assert out["tumor"].shape == (3,) and out["tumor"].dtype == jnp.float32
    assert not np.allclose(out["tumor"], out["mask"].max(axis=(1, 2, 3)))


def test_deep_supervision_adds_coarser_logit_maps_and_leaves_the_mask_alone():
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    plain = models.ResUNet(stem_features=4, features=(8, 16), bottleneck_features=16)
    deep = plain.clone(deep_supervision=2)
    variables = deep.init(jax.random.key(0), x)
    out = deep.apply(variables, x)
    assert [a.shape for a in out["aux_masks"]] == [(2, 16, 16, 1), (2, 8, 8, 1)]
    assert all(a.dtype == jnp.float32 for a in out["aux_masks"])
    # The extra heads are all it adds: the seed's weights give the seed's mask.
    seed = {
        "params": {k: v for k, v in variables["params"].items() if not k.startswith("aux_")},
        "batch_stats": variables["batch_stats"],
    }
    assert "aux_masks" not in plain.apply(seed, x)
    np.testing.assert_array_equal(plain.apply(seed, x)["mask"], out["mask"])
    with pytest.raises(ValueError, match=r"deep_supervision must be in \[0, 2\]"):
        plain.clone(deep_supervision=3).init(jax.random.key(0), x)


def test_train_mode_updates_batch_stats_inside_pmap():
    model = models.ResUNet(stem_features=4, features=(8,), bottleneck_features=8)
    x = jax.random.uniform(jax.random.key(1), (1, 2, 16, 16, 3))
    variables = model.init(jax.random.key(0), x[0])
    _, updates = jax.pmap(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), axis_name="batch"
    )(jax.tree.map(lambda a: a[None], variables), x)
    before = variables["batch_stats"]["stem_bn1"]["mean"]
    assert not np.allclose(updates["batch_stats"]["stem_bn1"]["mean"][0], before)


def test_upsample2x_is_nearest_neighbour():
    x = jnp.arange(4.0).reshape(1, 2, 2, 1)
    up = models.upsample2x(x)[0, :, :, 0]
    np.testing.assert_array_equal(up, [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


def test_rejects_sides_not_divisible_by_the_pooling():
    model = models.ResUNet(stem_features=4, features=(8,), bottleneck_features=8)
    with pytest.raises(ValueError, match="divisible by 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 18, 18, 3)))


def test_lacks_pre_contrast_finds_flair_copies_in_every_slice_of_the_context():
    rng = np.random.default_rng(0)
    complete = rng.uniform(0, 2, (16, 16, 9)).astype(np.float32)  # three slices of three
    copied = complete.copy()
    copied[..., 0::3] = copied[..., 1::3]  # every slice's pre-contrast is its FLAIR
    centre_only = complete.copy()
    centre_only[..., 3] = centre_only[..., 4]
    nearly = copied.copy()
    nearly[..., 0] += 1e-5  # rounding, not another image
    batch = np.stack([complete, copied, centre_only, nearly])
    for x in (batch, jnp.asarray(batch)):  # on a host backend's numpy and in the model
        found = models.lacks_pre_contrast(x)
        assert isinstance(found, type(x))
        np.testing.assert_array_equal(found, [False, True, False, True])


def test_no_contrast_routed_gives_each_slice_its_models_output():
    """Complete slices get the first model's logits, FLAIR-copy slices the second's."""
    config = {"stem_features": 4, "features": (8,), "bottleneck_features": 8, "dtype": "float32"}
    single = models.create_model(config)
    x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
    x = x.at[1:3, ..., 0].set(x[1:3, ..., 1])  # slices 1 and 2 without their pre-contrast
    complete, no_contrast = (single.init(jax.random.key(k), x) for k in (0, 1))
    joined = models.create_model(dict(config, no_contrast_expert=True))
    variables = {
        k: {"complete": complete[k], "no_contrast": no_contrast[k]}
        for k in ("params", "batch_stats")
    }
    assert jax.tree.map(jnp.shape, joined.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables
    )
    out = joined.apply(variables, x)
    want = {0: single.apply(complete, x), 1: single.apply(no_contrast, x)}
    for i, source in enumerate((0, 1, 1, 0)):
        for key in ("mask", "tumor"):
            np.testing.assert_allclose(out[key][i], want[source][key][i], rtol=1e-6)
    assert not np.allclose(want[0]["mask"], want[1]["mask"])  # the test can tell them apart
    with pytest.raises(ValueError, match="join_no_contrast_expert"):
        joined.apply(variables, x, train=True, mutable=["batch_stats"])
