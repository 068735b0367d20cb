import json
import os

import numpy as np
import pytest
import tifffile

from resunet_jax.data import synthetic

PATIENTS, SLICES, SIZE = 4, 8, 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle_3m")
    return str(root), synthetic.write_synthetic_dataset(root, PATIENTS, SLICES, SIZE, seed=3)


def _read(root, pid, k):
    stem = os.path.join(root, pid, f"{pid}_{k}")
    return tifffile.imread(stem + ".tif"), tifffile.imread(stem + "_mask.tif")


def test_writes_the_kaggle_3m_layout(dataset):
    root, ids = dataset
    assert ids == sorted(ids) and ids[0] == "TCGA_SY_A001_20000101" and len(ids) == PATIENTS
    assert sorted(os.listdir(root)) == sorted([*ids, "data.csv", "synthetic.json"])
    with open(os.path.join(root, "data.csv")) as f:
        assert f.read().splitlines() == ["Patient;source"] + [f"{p};synthetic" for p in ids]
    for pid in ids:
        # Numbered from 1 and not zero-padded, every image with its mask.
        expected = {
            f"{pid}_{k}{suffix}.tif" for k in range(1, SLICES + 1) for suffix in ("", "_mask")
        }
        assert set(os.listdir(os.path.join(root, pid))) == expected
    image, mask = _read(root, ids[0], 1)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8


def test_half_the_patients_are_zlib_compressed(dataset):
    root, ids = dataset
    compressions = []
    for pid in ids:
        for name in (f"{pid}_1.tif", f"{pid}_1_mask.tif"):
            with tifffile.TiffFile(os.path.join(root, pid, name)) as tif:
                compressions.append(tif.pages[0].compression)
    assert sorted(compressions) == [1] * PATIENTS + [8] * PATIENTS  # NONE, ADOBE_DEFLATE


def test_masks_are_binary_and_every_patient_has_a_lesion(dataset):
    root, ids = dataset
    for pid in ids:
        masks = np.stack([_read(root, pid, k)[1] for k in range(1, SLICES + 1)])
        assert set(np.unique(masks)) <= {0, 255}
        assert masks.any()


def test_lesions_span_one_run_of_slices_and_many_slices_have_none():
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(10):
        _, masks = synthetic.phantom_volume(rng, 20, 64)
        with_lesion = np.flatnonzero(masks.any(axis=(1, 2)))
        assert len(with_lesion) == with_lesion[-1] - with_lesion[0] + 1
        fractions.append(len(with_lesion) / 20)
    assert 0.3 <= np.mean(fractions) <= 0.55
    assert max(fractions) < 0.8


def test_lesions_are_bright_in_flair_but_not_alone_in_being_so():
    images, masks = synthetic.phantom_volume(np.random.default_rng(0), 20, 64)
    flair, lesion = images[..., 1].astype(float), masks > 0
    # Non-lesion head pixels are mostly brain, so their median is brain tissue.
    brain_level = np.median(flair[(flair > 0) & ~lesion])
    assert flair[lesion].mean() > brain_level + 40
    # The skull and other normal structures reach the lesion's brightness.
    assert (flair[~lesion] > np.percentile(flair[lesion], 50)).sum() > lesion.sum() / 4


def test_phantom_is_a_function_of_the_generator_state():
    a = synthetic.phantom_volume(np.random.default_rng(5), 6, 32)
    b = synthetic.phantom_volume(np.random.default_rng(5), 6, 32)
    c = synthetic.phantom_volume(np.random.default_rng(6), 6, 32)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_same_seed_writes_the_same_data(tmp_path):
    ids = synthetic.write_synthetic_dataset(tmp_path / "a", 2, 3, 16, seed=1)
    synthetic.write_synthetic_dataset(tmp_path / "b", 2, 3, 16, seed=1)
    synthetic.write_synthetic_dataset(tmp_path / "c", 2, 3, 16, seed=2)
    differs = False
    for pid in ids:
        for k in (1, 2, 3):
            a, b, c = (_read(str(tmp_path / d), pid, k) for d in "abc")
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
            differs |= not np.array_equal(a[0], c[0])
    assert differs


def test_written_once_and_redone_when_parameters_change(tmp_path):
    root = tmp_path / "data"
    ids = synthetic.write_synthetic_dataset(root, 3, 4, 16)
    path = os.path.join(root, ids[0], f"{ids[0]}_1.tif")
    mtime = os.stat(path).st_mtime_ns
    assert synthetic.write_synthetic_dataset(root, 3, 4, 16) == ids
    assert os.stat(path).st_mtime_ns == mtime

    # Fewer patients and slices: nothing of the larger dataset may remain.
    assert synthetic.write_synthetic_dataset(root, 2, 2, 16) == ids[:2]
    assert sorted(os.listdir(root)) == sorted([*ids[:2], "data.csv", "synthetic.json"])
    assert len(os.listdir(os.path.join(root, ids[0]))) == 4
    with open(os.path.join(root, "synthetic.json")) as f:
        assert json.load(f)["num_patients"] == 2


def test_an_interrupted_generation_is_redone(tmp_path):
    root = tmp_path / "data"
    ids = synthetic.write_synthetic_dataset(root, 2, 2, 16)
    os.remove(os.path.join(root, "synthetic.json"))  # as if killed before the marker
    path = os.path.join(root, ids[1], f"{ids[1]}_2_mask.tif")
    os.remove(path)
    synthetic.write_synthetic_dataset(root, 2, 2, 16)
    assert os.path.exists(path) and os.path.exists(os.path.join(root, "synthetic.json"))
