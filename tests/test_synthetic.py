import os

import numpy as np
import tifffile

from resunet_jax.data import lgg, synthetic


def test_writes_the_kaggle_3m_layout_in_both_compressions(tiny_data):
    slices = lgg.discover(tiny_data)
    assert len(lgg.patient_ids(slices)) == 6 and len(slices) == 36
    assert os.path.exists(
        os.path.join(tiny_data, "TCGA_SY_A001_20000101", "TCGA_SY_A001_20000101_6_mask.tif")
    )
    compressions = {tifffile.TiffFile(s.image_path).pages[0].compression for s in slices}
    assert compressions == {1, 8}  # none and zlib (deflate)
    image, mask = tifffile.imread(slices[0].image_path), tifffile.imread(slices[0].mask_path)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}


def test_every_patient_has_a_lesion_and_many_slices_have_none():
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(8):
        images, masks = synthetic.phantom_volume(rng, 20, 64)
        has_lesion = masks.reshape(20, -1).any(axis=1)
        assert has_lesion.any()
        fractions.append(has_lesion.mean())
        # Lesion pixels are brighter in FLAIR (channel 1) than the rest of the brain.
        brain = (images[..., 0] > 40) & (images[..., 0] < 140) & (masks == 0)
        assert images[..., 1][masks > 0].mean() > images[..., 1][brain].mean() + 40
    assert 0.2 < np.mean(fractions) < 0.6


def test_deterministic_and_written_only_once(tmp_path):
    a = synthetic.write_synthetic_dataset(tmp_path / "a", 2, 3, 16, seed=1)
    synthetic.write_synthetic_dataset(tmp_path / "b", 2, 3, 16, seed=1)
    for s in lgg.discover(str(tmp_path / "a")):
        other = s.image_path.replace(os.sep + "a" + os.sep, os.sep + "b" + os.sep)
        np.testing.assert_array_equal(tifffile.imread(s.image_path), tifffile.imread(other))
    path = lgg.discover(str(tmp_path / "a"))[0].image_path
    mtime = os.stat(path).st_mtime_ns
    assert synthetic.write_synthetic_dataset(tmp_path / "a", 2, 3, 16, seed=1) == a
    assert os.stat(path).st_mtime_ns == mtime
