import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tifffile
from scipy import ndimage

from configs import tiny
from resunet_jax import input_pipeline
from resunet_jax.data import lgg


def _config(image_size=32):
    config = tiny.get_config()
    config.data.image_size = image_size
    return config


def _builder(tiny_data, tmp_path):
    return lgg.prepare(tiny_data, str(tmp_path / "prep"), lgg.discover(tiny_data))


def test_train_batches_are_laid_out_per_device(tiny_data, tmp_path):
    builder = _builder(tiny_data, tmp_path)
    ids = lgg.patient_ids(lgg.discover(tiny_data))
    ds = input_pipeline.create_train_dataset(builder, ids[:4], _config(), 8, seed=0)
    batch = next(input_pipeline.as_numpy(ds))
    devices = jax.local_device_count()
    assert batch["image"].shape == (devices, 8 // devices, 32, 32, 3)
    assert batch["image"].dtype == np.float32 and 0 <= batch["image"].min() <= 1
    assert batch["mask"].shape == (devices, 8 // devices, 32, 32, 1)
    assert set(np.unique(batch["mask"])) <= {0, 1}
    again = next(
        input_pipeline.as_numpy(
            input_pipeline.create_train_dataset(builder, ids[:4], _config(), 8, seed=0)
        )
    )
    np.testing.assert_array_equal(batch["image"], again["image"])  # seeded = reproducible


def test_eval_dataset_visits_each_slice_of_the_patients_once(tiny_data, tmp_path):
    builder = _builder(tiny_data, tmp_path)
    ids = lgg.patient_ids(lgg.discover(tiny_data))
    ds = input_pipeline.create_eval_dataset(builder, ids[:2], _config(64), batch_size=5)
    batches = list(input_pipeline.as_numpy(ds))
    keys = [(p, i) for b in batches for p, i in zip(b["patient_id"], b["slice_index"], strict=True)]
    assert sorted(keys) == [(p, i) for p in ids[:2] for i in range(1, 7)]
    assert batches[0]["image"].shape[1:] == (64, 64, 3)
    assert batches[0]["orig_height"][0] == 32
    assert batches[0]["original_mask"].shape[1:] == (32, 32, 1)  # as read, not resized


def test_augment_keeps_masks_binary_and_aligned_with_images():
    image = np.zeros((5, 32, 32, 3), np.uint8)
    image[:, 8:16, 4:12] = 200
    mask = (image[..., :1] > 0).astype(np.uint8)
    aug = ml_collections.ConfigDict(
        dict(flip=True, rotate_degrees=30.0, scale=0.2, intensity=0.1, gamma=0.0)
    )
    params = [input_pipeline.augment_params(tf.constant([s, 1]), 32, aug) for s in range(5)]
    params = {k: tf.stack([p[k] for p in params]) for k in params[0]}
    out = input_pipeline.augment({"image": image, "mask": mask}, params, aug)
    m, im = out["mask"].numpy(), 255 * out["image"].numpy()
    assert im.dtype == np.float32 and m.shape == (5, 32, 32, 1)
    flipped = 0
    for i in range(5):
        assert set(np.unique(m[i])) <= {0, 1} and m[i].sum() > 20
        # Bright pixels and mask pixels coincide up to the interpolated border.
        agreement = np.mean((im[i, ..., 0] > 100) == (m[i, ..., 0] > 0))
        assert agreement > 0.97
        flipped += m[i, :, 16:].sum() > m[i, :, :16].sum()  # the square sits left
    assert 0 < flipped < 5  # some slices mirrored, some not


def test_augment_without_geometry_only_scales_intensity():
    image = np.full((2, 8, 8, 3), 100, np.uint8)
    mask = np.ones((2, 8, 8, 1), np.uint8)
    aug = ml_collections.ConfigDict(
        dict(flip=False, rotate_degrees=0.0, scale=0.0, intensity=0.5, gamma=0.0)
    )
    params = {"transform": tf.zeros([2, 8]), "gain": tf.constant([[1.0, 0.5, 3.0]] * 2)}
    out = input_pipeline.augment({"image": image, "mask": mask}, params, aug)
    np.testing.assert_allclose(out["image"].numpy()[0, 0, 0], [100 / 255, 50 / 255, 1.0])
    np.testing.assert_array_equal(out["mask"].numpy(), mask)


def test_blur_and_noise_change_the_image_not_the_mask():
    rng = np.random.default_rng(0)
    image = np.zeros((3, 32, 32, 3), np.float32)
    image[:, 4:28, 4:28] = rng.uniform(50, 150, (3, 24, 24, 3))
    # The blur is scipy's Gaussian filter (mirrored edges, cut at `radius`); σ 0 is none.
    sigma = np.array([0.0, 0.7, 1.5], np.float32)
    blurred = input_pipeline.gaussian_blur(tf.constant(image), tf.constant(sigma), 3).numpy()
    np.testing.assert_array_equal(blurred[0], image[0])
    for i in (1, 2):
        expected = ndimage.gaussian_filter(
            image[i], (sigma[i], sigma[i], 0), mode="reflect", truncate=3 / sigma[i]
        )
        np.testing.assert_allclose(blurred[i], expected, atol=1e-3)
    # Noise: std = fraction x the channel's mean over the head; the background (dim
    # noise up to the head level in the real scans) stays as it is.
    dim = np.where(image == 0, input_pipeline.HEAD_LEVEL, image).astype(np.float32)
    fraction = tf.constant([[0.1, 0.2, 0.0]] * 3)
    noisy = input_pipeline.add_noise(tf.constant(dim), fraction, tf.constant([4, 2])).numpy()
    added = (noisy - dim)[:, 4:28, 4:28]
    head_mean = image[:, 4:28, 4:28].mean(axis=(0, 1, 2))
    np.testing.assert_allclose(added.std(axis=(0, 1, 2)), [0.1, 0.2, 0] * head_mean, rtol=0.05)
    np.testing.assert_array_equal(noisy[:, :4], dim[:, :4])
    np.testing.assert_array_equal(noisy[:, :, 28:], dim[:, :, 28:])
    again = input_pipeline.add_noise(tf.constant(dim), fraction, tf.constant([4, 2])).numpy()
    np.testing.assert_array_equal(noisy, again)
    # Through augment: drawn σ and noise levels within their ranges, the mask untouched.
    aug = ml_collections.ConfigDict(
        dict(flip=False, rotate_degrees=0.0, scale=0.0, intensity=0.0, gamma=0.0)
    )
    aug.blur, aug.noise = 1.0, 0.1
    params = [input_pipeline.augment_params(tf.constant([s, 5]), 32, aug) for s in range(3)]
    params = {k: tf.stack([p[k] for p in params]) for k in params[0]}
    for key, top in (("blur", 1.0), ("noise", 0.1)):
        drawn = params[key].numpy()
        assert drawn.min() >= 0 and drawn.max() <= top and drawn.std() > 0
    mask = (image[..., :1] > 0).astype(np.uint8)
    out = input_pipeline.augment({"image": image.astype(np.uint8), "mask": mask}, params, aug)
    np.testing.assert_array_equal(out["mask"].numpy(), mask)
    assert np.abs(255 * out["image"].numpy() - image.astype(np.uint8)).max() > 5


def test_gamma_moves_mid_tones_and_keeps_black_and_white():
    image = np.zeros((1, 4, 4, 3), np.uint8)
    image[0, 0], image[0, 1], image[0, 2] = 0, 255, 100
    aug = ml_collections.ConfigDict(
        dict(flip=False, rotate_degrees=0.0, scale=0.0, intensity=0.0, gamma=0.4)
    )
    drawn = [input_pipeline.augment_params(tf.constant([s, 3]), 4, aug)["gamma"] for s in range(50)]
    drawn = np.stack(drawn)
    assert np.exp(-0.4) <= drawn.min() < 0.8 and 1.25 < drawn.max() <= np.exp(0.4)
    params = {"transform": tf.zeros([1, 8]), "gain": tf.ones([1, 3])}
    params["gamma"] = tf.constant([[0.5, 1.0, 2.0]])
    out = (
        255
        * input_pipeline.augment({"image": image, "mask": image[..., :1]}, params, aug)[
            "image"
        ].numpy()
    )
    np.testing.assert_allclose(out[0, 0, 0], [0, 0, 0], atol=1e-3)
    np.testing.assert_allclose(out[0, 1, 0], [255, 255, 255], atol=1e-3)
    expected = 255 * (100 / 255) ** np.array([0.5, 1.0, 2.0])
    np.testing.assert_allclose(out[0, 2, 0], expected, rtol=1e-5)


def test_warp_matches_tf_projective_transform():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (3, 16, 16, 2)).astype(np.float32)
    aug = ml_collections.ConfigDict(
        dict(flip=True, rotate_degrees=20.0, scale=0.2, intensity=0.0, gamma=0.0)
    )
    transforms = tf.stack(
        [input_pipeline.augment_params(tf.constant([s, 0]), 16, aug)["transform"] for s in range(3)]
    )
    ours = input_pipeline.warp_bilinear(tf.constant(images), transforms).numpy()
    reference = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=[16, 16],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    ).numpy()
    # Identical inside; TF zeroes a sample whose position falls outside the image,
    # ours blends with the zero border, so only the outermost ring may differ.
    np.testing.assert_allclose(ours[:, 1:-1, 1:-1], reference[:, 1:-1, 1:-1], atol=1e-3)


def test_resize_maps_masks_to_binary():
    ex = {"image": np.zeros((256, 256, 3), np.uint8), "mask": np.zeros((256, 256, 1), np.uint8)}
    ex["mask"][100:140, 100:140] = 1
    out = input_pipeline.resize_example(ex, 64)
    assert out["mask"].shape == (64, 64, 1)
    assert set(np.unique(out["mask"].numpy())) == {0, 1}
    assert out["mask"].numpy().sum() == 100  # 40x40 px at 1/4 scale


def test_resize_coverage_is_the_tumour_share_of_each_pixel():
    ex = {"image": np.zeros((256, 256, 3), np.uint8), "mask": np.zeros((256, 256, 1), np.uint8)}
    ex["mask"][102:142, 101:141] = 1  # edges inside the 4x4 blocks of the 1/4 scale
    out = input_pipeline.resize_example(ex, 64, coverage=True)
    cov = out["coverage"].numpy()
    assert cov.shape == (64, 64, 1) and cov.dtype == np.uint8
    assert cov[25, 30, 0] == 128 and cov[30, 25, 0] == 191  # 2/4 and 3/4 of the pixel
    assert cov[30, 30, 0] == 255 and cov[20, 20, 0] == 0
    np.testing.assert_allclose(cov.sum() / 255, 40 * 40 / 16, rtol=1e-2)
    np.testing.assert_array_equal(out["mask"].numpy(), cov >= 128)  # mask: share >= half
    assert "coverage" not in input_pipeline.resize_example(ex, 64)


def test_soft_masks_train_on_the_resampled_tumour_share(tiny_data, tmp_path):
    builder = _builder(tiny_data, tmp_path)
    ids = lgg.patient_ids(lgg.discover(tiny_data))
    config = _config(16)  # from 32 px: edge pixels are partly tumour
    batches = {}
    for soft in (False, True):
        config.data.soft_masks = soft
        ds = input_pipeline.create_train_dataset(builder, ids[:4], config, 16, seed=0)
        batches[soft] = next(input_pipeline.as_numpy(ds))
    hard, soft = batches[False]["mask"], batches[True]["mask"]
    assert soft.dtype == np.float32 and soft.shape == hard.shape
    assert soft.min() >= 0 and soft.max() <= 1
    assert np.mean((soft > 0) & (soft < 1)) > 0.005  # boundary pixels are shares
    np.testing.assert_array_equal(batches[True]["image"], batches[False]["image"])
    # Same slices, same warp: thresholded at half, the shares give the binary mask but
    # for the few border pixels where resampling before or after thresholding differs.
    assert np.mean((soft >= 0.5) == (hard > 0)) > 0.98
    np.testing.assert_allclose(soft.sum(), hard.sum(), rtol=0.1)


def test_crops_are_windows_of_the_slice_inside_it():
    # Pixel values encode their (x, y), so each crop shows where it was taken from.
    yy, xx = np.mgrid[:32, :32]
    image = np.stack([xx * 4, yy * 4, np.full_like(xx, 100)], -1).astype(np.uint8)[None]
    mask = ((xx >= 16) & (yy >= 16)).astype(np.uint8)[None, ..., None]
    aug = ml_collections.ConfigDict(
        dict(flip=False, rotate_degrees=0.0, scale=0.0, intensity=0.0, gamma=0.0)
    )
    for s in range(4):
        params = input_pipeline.augment_params(tf.constant([s, 2]), 32, aug, crop_size=16)
        params = {k: v[None] for k, v in params.items()}
        out = input_pipeline.augment({"image": image, "mask": mask}, params, aug, crop_size=16)
        im, m = 255 * out["image"].numpy()[0] / 4, out["mask"].numpy()[0, ..., 0]
        assert im.shape == (16, 16, 3) and m.shape == (16, 16)
        x0, y0 = im[0, 0, 0], im[0, 0, 1]
        assert 0 <= x0 <= 16 and 0 <= y0 <= 16  # the window lies inside the slice
        xs, ys = np.meshgrid(x0 + np.arange(16), y0 + np.arange(16))
        np.testing.assert_allclose(im[..., 0], xs, atol=1e-3)
        np.testing.assert_allclose(im[..., 1], ys, atol=1e-3)
        # The mask is cut from the same window: the bilinear value of its step edge at
        # x = y = 16, thresholded at half.
        fx, fy = np.clip(xs - 15, 0, 1), np.clip(ys - 15, 0, 1)
        np.testing.assert_array_equal(m, fx * fy >= 0.5)


def test_train_crops_have_the_crop_size_and_a_bad_size_is_refused(tiny_data, tmp_path):
    builder = _builder(tiny_data, tmp_path)
    ids = lgg.patient_ids(lgg.discover(tiny_data))
    config = _config()
    config.data.crop_size = 16
    batch = next(
        input_pipeline.as_numpy(input_pipeline.create_train_dataset(builder, ids[:4], config, 8, 0))
    )
    assert batch["image"].shape[-3:] == (16, 16, 3) and batch["mask"].shape[-3:] == (16, 16, 1)


def test_area_weighting_draws_large_tumours_more_often(tiny_data, tmp_path):
    builder = _builder(tiny_data, tmp_path)
    ids = lgg.patient_ids(lgg.discover(tiny_data))
    config = _config()
    config.augment.update(flip=False, rotate_degrees=0.0, scale=0.0, intensity=0.0, gamma=0.0)
    config.data.tumor_fraction = 1.0  # tumour slices only

    def drawn_areas(weight):
        config.data.tumor_area_weight = weight
        ds = input_pipeline.create_train_dataset(builder, ids[:4], config, 16, seed=0)
        masks = np.concatenate([b["mask"].reshape(16, -1) for b in ds.take(40).as_numpy_iterator()])
        return masks.sum(axis=1)

    # The areas of the tumour slices, at the model's 32 px, as the pipeline sees them.
    eval_ds = input_pipeline.create_eval_dataset(builder, ids[:4], config, 64)
    areas = np.concatenate(
        [b["mask"].reshape(len(b["mask"]), -1).sum(1) for b in eval_ds.as_numpy_iterator()]
    )
    areas = areas[areas > 0].astype(float)
    uniform, weighted = drawn_areas(0.0), drawn_areas(4.0)
    assert (uniform > 0).all() and (weighted > 0).all()
    np.testing.assert_allclose(uniform.mean(), areas.mean(), rtol=0.05)
    w = 1 + 4.0 * areas / areas.mean()  # each slice's relative draw probability
    np.testing.assert_allclose(weighted.mean(), (w * areas).sum() / w.sum(), rtol=0.05)
    assert weighted.mean() > 1.1 * uniform.mean()


def test_volume_normalisation_standardises_each_patient_whatever_its_gain(tiny_data, tmp_path):
    # Two copies of one patient, the second scanned at twice the gain (same zeros).
    source = lgg.discover(tiny_data)
    patient = source[0].patient_id
    for name, factor in (("TCGA_AA_0001_20000101", 1), ("TCGA_BB_0002_20000101", 2)):
        os.makedirs(tmp_path / "data" / name)
        for s in (s for s in source if s.patient_id == patient):
            image, mask = lgg.read_slice(s)
            tifffile.imwrite(
                tmp_path / "data" / name / f"{name}_{s.index}.tif", image // 2 * factor
            )
            tifffile.imwrite(tmp_path / "data" / name / f"{name}_{s.index}_mask.tif", mask * 255)
    data = str(tmp_path / "data")
    builder = lgg.prepare(data, str(tmp_path / "prep"), lgg.discover(data))
    config = _config()
    config.data.normalization = "volume"
    ids = ["TCGA_AA_0001_20000101", "TCGA_BB_0002_20000101"]
    batches = list(
        input_pipeline.as_numpy(input_pipeline.create_eval_dataset(builder, ids, config, 64))
    )
    images = {}
    for p in ids:
        order = np.concatenate([b["slice_index"][b["patient_id"] == p] for b in batches])
        image = np.concatenate([b["image"][b["patient_id"] == p] for b in batches])
        display = np.concatenate([b["display"][b["patient_id"] == p] for b in batches])
        brain = display.max(-1) > 0
        np.testing.assert_allclose(image[brain].mean(0), 0.0, atol=1e-4)
        np.testing.assert_allclose(image[brain].std(0), 1.0, atol=2e-3)
        images[p] = image[np.argsort(order)]
    # Resizing rounds to uint8, so the copies differ by up to a grey level.
    np.testing.assert_allclose(images[ids[0]], images[ids[1]], atol=0.1)
    assert np.abs(images[ids[0]] - images[ids[1]]).mean() < 0.01
    # Training batches carry the same statistics through augmentation.
    config.augment.update(flip=False, rotate_degrees=0.0, scale=0.0, intensity=0.0, gamma=0.0)
    batch = next(
        input_pipeline.as_numpy(input_pipeline.create_train_dataset(builder, ids, config, 8, 0))
    )
    train_images = batch["image"].reshape(-1, 32 * 32, 3)
    every_slice = np.concatenate(list(images.values())).reshape(-1, 32 * 32, 3)
    for x in train_images:  # each drawn slice is one of the normalised slices
        assert np.abs(every_slice - x).max(axis=(1, 2)).min() < 1e-5
    with pytest.raises(ValueError, match="needs the volume's statistics"):
        input_pipeline.normalize(np.zeros((4, 4, 3)), "volume")


def test_elastic_deformation_bends_image_and_mask_together():
    image = np.zeros((4, 64, 64, 3), np.uint8)
    image[:, 16:48, 20:44] = 200
    mask = (image[..., :1] > 0).astype(np.uint8)
    aug = ml_collections.ConfigDict(
        dict(flip=False, rotate_degrees=0.0, scale=0.0, intensity=0.0, gamma=0.0, elastic=0.05)
    )
    params = [input_pipeline.augment_params(tf.constant([s, 7]), 64, aug) for s in range(4)]
    shifts = np.stack([p["displacement"].numpy() for p in params])
    assert shifts.shape == (4, input_pipeline.ELASTIC_GRID, input_pipeline.ELASTIC_GRID, 2)
    np.testing.assert_allclose(shifts.std(), 0.05 * 64, rtol=0.25)  # std = elastic x side
    params = {k: tf.stack([p[k] for p in params]) for k in params[0]}
    out = input_pipeline.augment({"image": image, "mask": mask}, params, aug)
    m, im = out["mask"].numpy()[..., 0], 255 * out["image"].numpy()[..., 0]
    for i in range(4):
        assert (m[i] != mask[i, ..., 0]).sum() > 20  # the square is bent ...
        assert abs(int(m[i].sum()) - int(mask[i].sum())) < 0.2 * mask[i].sum()  # ... not lost
        assert np.mean((im[i] > 100) == (m[i] > 0)) > 0.98  # and its mask follows it
    # Off (the default), the draw has no displacement and the warp is skipped.
    aug.elastic = 0.0
    assert "displacement" not in input_pipeline.augment_params(tf.constant([0, 7]), 64, aug)


def test_context_slices_add_the_neighbours_channels_around_the_slice(tiny_data, tmp_path):
    builder = _builder(tiny_data, tmp_path)
    ids = lgg.patient_ids(lgg.discover(tiny_data))
    flat, context = _config(), _config()
    context.data.context_slices = 1
    # Training draws the same slices and augmentations: the middle channels are the 2-D
    # pipeline's image (gains and gammas apply to every context slice alike).
    batches = [
        next(
            input_pipeline.as_numpy(input_pipeline.create_train_dataset(builder, ids[:4], c, 8, 0))
        )
        for c in (flat, context)
    ]
    assert batches[1]["image"].shape[-1] == 9
    np.testing.assert_allclose(batches[1]["image"][..., 3:6], batches[0]["image"], atol=1e-5)
    np.testing.assert_array_equal(batches[1]["mask"], batches[0]["mask"])
    # Evaluation: channels 0-2 hold the previous slice of the same patient, 6-8 the next.
    (batch,) = input_pipeline.as_numpy(
        input_pipeline.create_eval_dataset(builder, ids[:2], context, 64)
    )
    assert batch["display"].shape[-1] == 3
    for p in ids[:2]:
        mine = batch["patient_id"] == p
        order = np.argsort(batch["slice_index"][mine])
        x = batch["image"][mine][order]
        np.testing.assert_allclose(x[..., 3:6], batch["display"][mine][order] / 255.0, atol=1e-6)
        np.testing.assert_array_equal(x[1:, ..., 0:3], x[:-1, ..., 3:6])
        np.testing.assert_array_equal(x[:-1, ..., 6:9], x[1:, ..., 3:6])
        np.testing.assert_array_equal(x[0, ..., 0:3], x[0, ..., 3:6])  # the ends repeat
        np.testing.assert_array_equal(x[-1, ..., 6:9], x[-1, ..., 3:6])


def test_missing_sequences_are_filled_with_the_flair_of_their_slice():
    # Two slices of context (6 channels): pre, FLAIR, post of each differ.
    image = np.tile(np.arange(1, 7, dtype=np.uint8), (3, 4, 4, 1))
    missing = np.array([[True, False], [False, True], [True, True]])
    out = input_pipeline.drop_sequences(tf.constant(image), missing).numpy()
    np.testing.assert_array_equal(
        out[:, 0, 0], [[2, 2, 3, 5, 5, 6], [1, 2, 2, 4, 5, 5], [2, 2, 2, 5, 5, 5]]
    )
    aug = ml_collections.ConfigDict(
        dict(flip=False, rotate_degrees=0.0, scale=0.0, intensity=0.0, gamma=0.0)
    )
    assert "missing" not in input_pipeline.augment_params(tf.constant([0, 1]), 8, aug)
    aug.missing_sequences = 0.3
    drawn = np.array(
        [input_pipeline.augment_params(tf.constant([s, 1]), 8, aug)["missing"] for s in range(600)]
    )
    cases = {tuple(m): np.mean((drawn == m).all(1)) for m in ([0, 0], [1, 0], [0, 1], [1, 1])}
    assert 0.64 < cases[(0, 0)] < 0.76  # 0.7 keep all three; 0.1 each way of losing some
    assert all(0.06 < cases[m] < 0.14 for m in ((1, 0), (0, 1), (1, 1)))
    # Through `augment`: the dropped channels carry the FLAIR (no gain, no geometry).
    params = {"transform": tf.zeros([3, 8]), "gain": tf.ones([3, 3]), "missing": missing}
    batch = {"image": image[..., :3], "mask": np.zeros((3, 4, 4, 1), np.uint8)}
    out = input_pipeline.augment(batch, params, aug)["image"].numpy() * 255
    np.testing.assert_allclose(out[:, 0, 0], [[2, 2, 3], [1, 2, 2], [2, 2, 2]], rtol=1e-6)


def test_tumour_paste_moves_the_next_slices_tumour_into_the_head():
    """Slice 0 receives slice 1's tumour (inside its own head only) and keeps its own;
    slice 1 receives from tumour-free slice 2 and slice 2 (paste false) from slice 0:
    both unchanged."""
    image = np.zeros((3, 8, 8, 3), np.float32)
    mask = np.zeros((3, 8, 8, 1), np.float32)
    image[0] = input_pipeline.HEAD_LEVEL  # dim background noise, as in the real scans
    image[0, :, :5] = 20.0  # head of slice 0: columns 0-4
    mask[0, 0, 0] = 1.0  # its own tumour
    image[1] = 200.0
    mask[1, 2:4, 3:7] = 1.0  # donor tumour, half outside slice 0's head
    image[2] = 50.0  # no tumour: receiving from it changes nothing
    slices = tf.constant(np.concatenate([image, mask], -1))
    out = input_pipeline.paste_tumours(slices, tf.constant([True, True, False])).numpy()
    want = np.concatenate([image, mask], -1)
    want[0, 2:4, 3:5] = 200.0, 200.0, 200.0, 1.0  # inside the head only
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(
        input_pipeline.paste_tumours(slices, tf.constant([False] * 3)).numpy(), slices.numpy()
    )
    aug = ml_collections.ConfigDict(
        dict(flip=False, rotate_degrees=0.0, scale=0.0, intensity=0.0, gamma=0.0)
    )
    assert "paste" not in input_pipeline.augment_params(tf.constant([0, 1]), 8, aug)
    aug.tumor_paste = 0.25
    drawn = [
        input_pipeline.augment_params(tf.constant([s, 1]), 8, aug)["paste"] for s in range(400)
    ]
    assert 0.19 < np.mean(drawn) < 0.31
    # Through `augment`, on uint8 slices: the pasted tumour is in the mask and the image.
    paste = [True, True, False]
    params = {"transform": tf.zeros([3, 8]), "gain": tf.ones([3, 3]), "paste": paste}
    batch = {"image": image.astype(np.uint8), "mask": mask.astype(np.uint8)}
    out = input_pipeline.augment(batch, params, aug)
    np.testing.assert_array_equal(out["mask"].numpy(), want[..., 3:].astype(np.uint8))
    np.testing.assert_allclose(out["image"].numpy()[0, 2, 3], [200 / 255.0] * 3, rtol=1e-6)


def test_eval_can_score_as_if_sequences_were_missing(tiny_data, tmp_path):
    builder = _builder(tiny_data, tmp_path)
    ids = lgg.patient_ids(lgg.discover(tiny_data))[:1]
    config = _config()

    def images(missing):
        config.eval.missing_sequences = missing
        ds = input_pipeline.create_eval_dataset(builder, ids, config, 64)
        return next(input_pipeline.as_numpy(ds))["image"]

    full, pre, both = images(""), images("pre"), images("both")
    assert not np.array_equal(full[..., 0], full[..., 1])
    np.testing.assert_array_equal(pre[..., 0], full[..., 1])
    np.testing.assert_array_equal(pre[..., 1:], full[..., 1:])
    np.testing.assert_array_equal(both, np.repeat(full[..., 1:2], 3, -1))
