import os

import numpy as np
import pytest
import tifffile

from resunet_jax import errors, preprocess
from resunet_jax.data import arrays, lgg, tfds_lgg


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
    with pytest.raises(errors.DataError, match=r"P_2\.tif: image has no mask"):
        lgg.discover(str(tmp_path))
    with pytest.raises(errors.DataError, match="does not exist"):
        lgg.discover(str(tmp_path / "nope"))


def test_bad_mask_values_and_unreadable_files_name_the_file(tmp_path):
    path = str(tmp_path / "m.tif")
    tifffile.imwrite(path, np.full((4, 4), 7, np.uint8))
    with pytest.raises(errors.DataError, match=r"m\.tif: mask values"):
        lgg.read_mask(path)
    with open(path, "wb") as f:
        f.write(b"not a tiff")
    with pytest.raises(errors.DataError, match=r"m\.tif: unreadable TIFF"):
        lgg.read_image(path)


def test_patient_split_is_deterministic_disjoint_and_covering():
    ids = [f"p{i:02d}" for i in range(17)]
    folds = [lgg.split_patients(ids, 4, f, seed=0) for f in range(4)]
    assert folds[0] == lgg.split_patients(list(reversed(ids)), 4, 0, seed=0)
    vals = [v for _, v in folds]
    assert sorted(sum(vals, [])) == ids  # every patient validates exactly once
    for train, val in folds:
        assert not set(train) & set(val) and len(train) + len(val) == 17
    with pytest.raises(errors.DataError, match="too few"):
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
    builder = tfds_lgg.prepare(str(src), str(tmp_path / "prep"), slices)
    examples = sorted(
        builder.as_dataset(split=tfds_lgg.SPLIT).as_numpy_iterator(), key=lambda e: e["slice_index"]
    )
    assert [e["slice_index"] for e in examples] == [1, 2, 3]
    np.testing.assert_array_equal(examples[0]["image"], lgg.read_image(slices[0].image_path))
    np.testing.assert_array_equal(examples[0]["mask"][..., 0], lgg.read_mask(slices[0].mask_path))
    prepared = os.listdir(tmp_path / "prep")
    tfds_lgg.prepare(str(src), str(tmp_path / "prep"), slices)  # reused, not prepared again
    assert os.listdir(tmp_path / "prep") == prepared


def test_arrays_are_the_slices_as_read_and_resized_in_patient_then_slice_order(tmp_path):
    _write_patient(tmp_path / "src", "Q", 2, size=20)
    _write_patient(tmp_path / "src", "P", 11)
    slices = lgg.discover(str(tmp_path / "src"))
    out = arrays.load(str(tmp_path / "src"), slices, ["Q", "P"], 8, str(tmp_path / "prep"))

    assert out["patient_id"].tolist() == ["P"] * 11 + ["Q"] * 2
    assert out["slice_index"].tolist() == list(range(1, 12)) + [1, 2]
    assert out["image"].shape == (13, 8, 8, 3) and out["mask"].shape == (13, 8, 8, 1)
    assert out["original_mask"].shape == (13, 20, 20)  # the largest slice
    assert out["orig_height"].tolist() == [16] * 11 + [20] * 2
    for i, s in enumerate(slices):
        image, mask = lgg.read_slice(s)
        np.testing.assert_array_equal(out["image"][i], preprocess.resize_images(image[None], 8)[0])
        np.testing.assert_array_equal(out["mask"][i], preprocess.resize_masks(mask[None], 8)[0])
        h, w = mask.shape
        np.testing.assert_array_equal(out["original_mask"][i, :h, :w], mask)
        assert not out["original_mask"][i, h:].any() and not out["original_mask"][i, :, w:].any()


def test_arrays_are_cached_and_an_edited_folder_is_read_again(tmp_path, monkeypatch):
    src, prep = str(tmp_path / "src"), str(tmp_path / "prep")
    _write_patient(src, "P", 3)
    _write_patient(src, "Q", 2)
    first = arrays.load(src, lgg.discover(src), ["P"], 8, prep)
    read_slice = lgg.read_slice

    def refuse(s):
        raise AssertionError(f"{s.image_path} read again")

    monkeypatch.setattr(lgg, "read_slice", refuse)
    again = arrays.load(src, lgg.discover(src), ["P"], 8, prep)
    for k in first:
        np.testing.assert_array_equal(again[k], first[k])

    # An edited slice changes the folder's fingerprint: its slices are read again.
    monkeypatch.setattr(lgg, "read_slice", read_slice)
    path = os.path.join(src, "P", "P_2.tif")
    tifffile.imwrite(path, np.full((16, 16, 3), 200, np.uint8))
    edited = arrays.load(src, lgg.discover(src), ["P"], 8, prep)
    assert (edited["image"][1] == 200).all() and not (first["image"][1] == 200).all()
    np.testing.assert_array_equal(edited["image"][0], first["image"][0])


def test_arrays_name_every_unusable_file_and_cache_nothing(tmp_path):
    src, prep = str(tmp_path / "src"), str(tmp_path / "prep")
    _write_patient(src, "P", 2)
    _write_patient(src, "Q", 2)
    (tmp_path / "src" / "P" / "P_1.tif").write_bytes(b"not a tiff")
    tifffile.imwrite(tmp_path / "src" / "Q" / "Q_2_mask.tif", np.full((16, 16), 7, np.uint8))
    with pytest.raises(errors.DataError, match="2 unusable file") as e:
        arrays.load(src, lgg.discover(src), ["P", "Q"], 8, prep)
    assert "P_1.tif: unreadable TIFF" in str(e.value)
    assert "Q_2_mask.tif: mask values" in str(e.value)
    assert not any(files for _, _, files in os.walk(prep))


def test_prepare_uses_the_copy_of_a_job_that_prepared_the_same_folder_first(tmp_path, monkeypatch):
    # Two fold runs started together both find the folder unprepared; the one that
    # finishes second must use the first one's copy, not fail to rename over it.
    src, prep = tmp_path / "src", tmp_path / "prep"
    _write_patient(src, "P", 3)
    slices = lgg.discover(str(src))
    generate = tfds_lgg.LggBuilder._generate_examples
    other_job = []

    def generate_while_another_job_finishes(self, data_dir):
        if not other_job:
            other_job.append("started")
            other_job.append(tfds_lgg.prepare(str(src), str(prep), slices))
        yield from generate(self, data_dir)

    monkeypatch.setattr(
        tfds_lgg.LggBuilder, "_generate_examples", generate_while_another_job_finishes
    )
    builder = tfds_lgg.prepare(str(src), str(prep), slices)
    assert len(other_job) == 2 and builder.is_prepared()
    assert builder.info.splits[tfds_lgg.SPLIT].num_examples == 3
    assert os.listdir(prep / os.listdir(prep)[0] / "lgg_builder") == ["1.0.0"]
