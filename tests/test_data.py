import os

import numpy as np
import pytest
import tifffile

from resunet_jax.data import lgg


def _write_patient(root, pid, n, compression=None, size=16):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, pid), exist_ok=True)
    for k in range(1, n + 1):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[2:5, 3:7] = 255 if k % 2 else 0
        tifffile.imwrite(os.path.join(root, pid, f"{pid}_{k}.tif"), image, compression=compression)
        tifffile.imwrite(
            os.path.join(root, pid, f"{pid}_{k}_mask.tif"), mask, compression=compression
        )


def test_discover_sorts_slices_numerically_and_pairs_masks(tmp_path):
    _write_patient(tmp_path, "TCGA_AA_0002_2000", 11)
    _write_patient(tmp_path, "TCGA_AA_0001_2000", 2)
    slices = lgg.discover(str(tmp_path))
    assert [s.patient_id for s in slices] == ["TCGA_AA_0001_2000"] * 2 + ["TCGA_AA_0002_2000"] * 11
    assert [s.index for s in slices[2:]] == list(range(1, 12))  # 10 after 9, not after 1
    assert slices[3].mask_path.endswith("TCGA_AA_0002_2000_2_mask.tif")


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_read_decodes_uncompressed_and_zlib(tmp_path, compression):
    _write_patient(tmp_path, "P", 1, compression=compression)
    s = lgg.discover(str(tmp_path))[0]
    image, mask = lgg.read_image(s.image_path), lgg.read_mask(s.mask_path)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1} and mask.sum() == 12
    assert tifffile.TiffFile(s.image_path).pages[0].compression == (8 if compression else 1)


def test_missing_mask_and_missing_folder_name_the_path(tmp_path):
    _write_patient(tmp_path, "P", 2)
    os.remove(tmp_path / "P" / "P_2_mask.tif")
    with pytest.raises(lgg.DataError, match=r"P_2\.tif: image has no mask"):
        lgg.discover(str(tmp_path))
    with pytest.raises(lgg.DataError, match="does not exist"):
        lgg.discover(str(tmp_path / "nope"))


def test_bad_mask_values_and_unreadable_files_name_the_file(tmp_path):
    path = str(tmp_path / "m.tif")
    tifffile.imwrite(path, np.full((4, 4), 7, np.uint8))
    with pytest.raises(lgg.DataError, match=r"m\.tif: mask values"):
        lgg.read_mask(path)
    with open(path, "wb") as f:
        f.write(b"not a tiff")
    with pytest.raises(lgg.DataError, match=r"m\.tif: unreadable TIFF"):
        lgg.read_image(path)


def test_patient_split_is_deterministic_disjoint_and_covering():
    ids = [f"p{i:02d}" for i in range(17)]
    folds = [lgg.split_patients(ids, 4, f, seed=0) for f in range(4)]
    assert folds[0] == lgg.split_patients(list(reversed(ids)), 4, 0, seed=0)
    vals = [v for _, v in folds]
    assert sorted(sum(vals, [])) == ids  # every patient validates exactly once
    for train, val in folds:
        assert not set(train) & set(val) and len(train) + len(val) == 17
    with pytest.raises(lgg.DataError, match="too few"):
        lgg.split_patients(ids[:3], 4, 0, seed=0)


def test_fingerprint_changes_with_the_file_list(tmp_path):
    _write_patient(tmp_path, "P", 2)
    before = lgg.fingerprint(str(tmp_path), lgg.discover(str(tmp_path)))
    assert before == lgg.fingerprint(str(tmp_path), lgg.discover(str(tmp_path)))
    _write_patient(tmp_path, "Q", 1)
    assert before != lgg.fingerprint(str(tmp_path), lgg.discover(str(tmp_path)))


def test_prepare_builds_tfds_once_and_round_trips_pixels(tmp_path):
    src = tmp_path / "src"
    _write_patient(src, "P", 3, compression="zlib")
    slices = lgg.discover(str(src))
    builder = lgg.prepare(str(src), str(tmp_path / "prep"), slices)
    examples = sorted(
        builder.as_dataset(split=lgg.SPLIT).as_numpy_iterator(), key=lambda e: e["slice_index"]
    )
    assert [e["slice_index"] for e in examples] == [1, 2, 3]
    np.testing.assert_array_equal(examples[0]["image"], lgg.read_image(slices[0].image_path))
    np.testing.assert_array_equal(examples[0]["mask"][..., 0], lgg.read_mask(slices[0].mask_path))
    prepared = os.listdir(tmp_path / "prep")
    lgg.prepare(str(src), str(tmp_path / "prep"), slices)  # reused, not prepared again
    assert os.listdir(tmp_path / "prep") == prepared
