"""NIfTI and DICOM input, NIfTI output, patients.csv and the Predictor API.

Patients are synthetic phantoms written three ways: .tif slices, NIfTI volumes and DICOM
series; an untrained tiny model predicts them (its near-0.5 probabilities make masks
that change with any change of the input, so equal masks mean equal model inputs).
"""

import csv
import json
import os
import re
import sys
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from test_predict import _export_tiny

from configs import tiny
from resunet_jax import errors, inference, predict
from resunet_jax.data import synthetic, volumes

SPACING = (0.9, 0.8, 3.0)  # column, row, slice (mm)
PATIENTS = ("P1", "P2")


def _patient(seed: int) -> np.ndarray:
    """[Z, S, S, 3] uint8 phantom whose every sequence spans 0..255, as a Kaggle volume."""
    images, _ = synthetic.phantom_volume(np.random.default_rng(seed), 6, 32)
    images = images.astype(np.float64)
    lo, hi = images.min(axis=(0, 1, 2)), images.max(axis=(0, 1, 2))
    return np.round((images - lo) * 255.0 / (hi - lo)).astype(np.uint8)


def _write_nifti(stack, path, scale=1.0, offset=0.0, dtype=np.uint8):
    data, affine = volumes.slices_to_volume(stack, SPACING)
    nib.save(nib.Nifti1Image((data * float(scale) + offset).astype(dtype), affine), str(path))
    return affine


def _write_dicom(
    stack, folder, series_uid=None, description="FLAIR", contrast="", coronal=False, study="1.2.3"
):
    """An MR series of uint16 slices, standard axial orientation (or coronal), files in
    random order; `contrast` fills ContrastBolusAgent."""
    os.makedirs(folder, exist_ok=True)
    series_uid = series_uid or generate_uid()
    for k, image in enumerate(stack):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.SeriesDescription = "MR", "P", description
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.InstanceNumber = k + 1
        if coronal:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
            ds.ImagePositionPatient = [0.0, k * SPACING[2], 0.0]
        else:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0.0, 0.0, k * SPACING[2]]
        if contrast:
            ds.ContrastBolusAgent = contrast
        ds.PixelSpacing = [SPACING[1], SPACING[0]]  # row spacing, column spacing
        ds.SliceThickness = SPACING[2]
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = image.astype(np.uint16).tobytes()
        ds.save_as(os.path.join(folder, f"{ds.SOPInstanceUID}.dcm"), enforce_file_format=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _export_tiny(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """{patient: [Z, S, S, 3] uint8}, written under root/ as tif/<p>/<p>_<k>.tif,
    nifti/<p>/<p>_{pre,flair,post}.nii.gz, dicom/<p>/{t1,flair,t1ce}/ (series) and
    rescaled/<p>/ (NIfTI, int16 x13 + 200)."""
    root = tmp_path_factory.mktemp("scans")
    stacks = {}
    for seed, p in enumerate(PATIENTS):
        stacks[p] = stack = _patient(seed)
        for kind in ("tif", "nifti", "rescaled"):
            os.makedirs(root / kind / p)
        for k, image in enumerate(stack):
            tifffile.imwrite(root / "tif" / p / f"{p}_{k + 1}.tif", image)
        for channel, role in enumerate(volumes.SEQUENCES):
            _write_nifti(stack[..., channel], root / "nifti" / p / f"{p}_{role}.nii.gz")
            _write_nifti(
                stack[..., channel], root / "rescaled" / p / f"{p}_{role}.nii", 13, 200, np.int16
            )
            folder = {"pre": "t1", "flair": "flair", "post": "t1ce"}[role]
            _write_dicom(stack[..., channel], root / "dicom" / p / folder)
    return root, stacks


def _predict(model, path, workdir, **settings):
    config = tiny.get_config()
    config.checkpoint = model
    config.predict.input = str(path)
    config.predict.update(settings)
    rows = predict.predict(config, str(workdir))
    with open(os.path.join(workdir, "predict", "patients.csv")) as f:
        return rows, {r["patient"]: r for r in csv.DictReader(f)}


def _tif_masks(folder, patient, n):
    return np.stack(
        [tifffile.imread(folder / f"{patient}_{k}_pred_mask.tif") > 0 for k in range(1, n + 1)]
    )


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1) if a.any() or b.any() else 1.0


def test_nifti_and_dicom_copies_predict_the_masks_of_the_tif_slices(tmp_path, model, scans):
    """Without reframing (these 32 x 32 phantoms are no heads in a 256 frame) a volume's
    slices reach the model exactly as its .tif copies do."""
    root, stacks = scans
    rows, patients = _predict(
        model, root, tmp_path / "work", save_probabilities=True, reframe=False
    )
    assert not any(r["error"] for r in rows)
    out = tmp_path / "work" / "predict"
    _, affine = volumes.slices_to_volume(stacks["P1"][..., 0], SPACING)
    any_tumour = False
    for p, stack in stacks.items():
        tif = _tif_masks(out / "tif" / p, p, len(stack))
        any_tumour |= tif.any()
        for kind in ("nifti", "dicom", "rescaled"):
            image = nib.load(out / kind / f"{p}_pred_mask.nii.gz")
            assert image.shape == (32, 32, 6) and image.get_data_dtype() == np.uint8
            np.testing.assert_allclose(image.affine, affine, atol=1e-5)
            assert image.header["sform_code"] > 0  # viewers place it by the affine
            if kind == "dicom":  # NIfTI: the input header's units (unset in these files)
                assert image.header.get_xyzt_units()[0] == "mm"
            data = np.asanyarray(image.dataobj)
            assert set(np.unique(data)) <= {0, 1}
            mask = data.transpose(2, 1, 0) > 0  # the input's grid -> Kaggle slices
            assert _dice(mask, tif) >= 0.99, (kind, p)
            np.testing.assert_array_equal(mask, tif)  # in fact identical
            row = patients[f"{kind}/{p}"]
            assert row["lesion_volume_unit"] == "mL" and row["num_slices"] == "6"
            voxel_ml = SPACING[0] * SPACING[1] * SPACING[2] / 1000
            assert float(row["lesion_volume"]) == pytest.approx(mask.sum() * voxel_ml, abs=1e-3)
            assert int(row["slices_with_tumor"]) == int(tif.any(axis=(1, 2)).sum())
            probs = nib.load(out / kind / f"{p}_pred_prob.nii.gz")
            assert probs.get_data_dtype() == np.float32 and probs.shape == image.shape
            assert (data <= (probs.get_fdata() >= 0.5)).all()
        assert patients[f"tif/{p}"]["lesion_volume_unit"] == "pixels"
        assert int(patients[f"tif/{p}"]["lesion_volume"]) == int(tif.sum())
    assert any_tumour  # else equal masks would prove little


def test_dicom_series_reads_back_with_an_independent_reader(scans):
    """The test series is valid MR DICOM: pydicom and nibabel's DICOM wrappers read each
    file's pixels and position, evenly spaced along the slice normal in slice order."""
    with warnings.catch_warnings():  # "experimental": its series readers, not used here
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers
    root, stacks = scans
    folder = root / "dicom" / "P1" / "flair"
    indicators = {}
    for name in os.listdir(folder):
        ds = pydicom.dcmread(folder / name)
        assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR"
        wrapper = dicomwrappers.wrapper_from_data(ds)
        k = int(ds.InstanceNumber) - 1
        np.testing.assert_array_equal(wrapper.get_data(), stacks["P1"][k, ..., 1])
        np.testing.assert_allclose(wrapper.image_position, [0.0, 0.0, k * SPACING[2]])
        indicators[k] = wrapper.slice_indicator
    steps = np.diff([indicators[k] for k in range(6)])
    np.testing.assert_allclose(np.abs(steps), SPACING[2])
    assert len(np.unique(np.sign(steps))) == 1


def test_a_volume_in_another_orientation_gives_the_same_masks(tmp_path, model, scans):
    """Stored sagittal-first (axes L, I, P: the slice axis second and flipped, with a
    matching affine), a volume is reoriented to the same slices, and its mask is written
    back in its own axes."""
    _, stacks = scans
    stack = stacks["P1"][..., 1]  # FLAIR only
    data, affine = volumes.slices_to_volume(stack, SPACING)
    os.makedirs(tmp_path / "in")
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "in" / "axial.nii.gz"))
    # Voxel (i, j, k) of the new array is voxel (i, k, Z - 1 - j) of the old one.
    z = data.shape[2]
    index_to_old = np.array(
        [[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, z - 1], [0, 0, 0, 1]], np.float64
    )
    turned = data.transpose(0, 2, 1)[:, ::-1]
    nib.save(nib.Nifti1Image(turned, affine @ index_to_old), str(tmp_path / "in" / "turned.nii.gz"))
    assert nib.aff2axcodes(affine @ index_to_old) == ("L", "I", "P")
    rows, _ = _predict(model, tmp_path / "in", tmp_path / "work", reframe=False)
    assert not any(r["error"] for r in rows)
    out = tmp_path / "work" / "predict"
    axial = np.asanyarray(nib.load(out / "axial_pred_mask.nii.gz").dataobj)
    turned_mask = nib.load(out / "turned_pred_mask.nii.gz")
    np.testing.assert_allclose(turned_mask.affine, affine @ index_to_old, atol=1e-5)
    np.testing.assert_array_equal(
        np.asanyarray(turned_mask.dataobj), axial.transpose(0, 2, 1)[:, ::-1]
    )


def test_each_bad_input_gets_one_error_and_the_others_are_predicted(tmp_path, model, scans):
    _, stacks = scans
    flair = stacks["P1"][..., 1]
    good = tmp_path / "in" / "good.nii.gz"
    os.makedirs(tmp_path / "in" / "shapes")
    os.makedirs(tmp_path / "in" / "grids")
    _write_nifti(flair, good)
    nib.save(
        nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.int16), np.eye(4)), tmp_path / "in" / "fourd.nii"
    )
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), tmp_path / "in" / "flat.nii")
    _write_nifti(flair, tmp_path / "in" / "shapes" / "s_flair.nii.gz")
    _write_nifti(flair[: len(flair) // 2], tmp_path / "in" / "shapes" / "s_t1.nii.gz")
    _write_nifti(flair, tmp_path / "in" / "grids" / "g_flair.nii.gz")
    data, affine = volumes.slices_to_volume(flair, SPACING)
    nib.save(
        nib.Nifti1Image(data, affine * [[1], [1], [2], [1]]),
        tmp_path / "in" / "grids" / "g_t1ce.nii.gz",
    )
    (tmp_path / "in" / "notes.nii.gz").write_text("not a volume")
    _write_dicom(flair, tmp_path / "in" / "mixed")  # two patients' series in one folder
    _write_dicom(flair, tmp_path / "in" / "mixed", description="AX FLAIR", study="9.8")
    _write_dicom(flair[:1], tmp_path / "in" / "single")
    os.makedirs(tmp_path / "in" / "empty")
    report = Dataset()
    report.file_meta = FileMetaDataset()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic SR
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID = generate_uid()
    report.SOPClassUID, report.Modality = report.file_meta.MediaStorageSOPClassUID, "SR"
    report.save_as(tmp_path / "in" / "empty" / "report.dcm", enforce_file_format=True)
    rows, patients = _predict(model, tmp_path / "in", tmp_path / "work", reframe=False)
    errors = {os.path.relpath(r["file"], tmp_path / "in"): r["error"] for r in rows if r["error"]}
    expected = {
        "fourd.nii": "fourd.nii: a 4-D image of shape (8, 8, 4, 2); expected one 3-D volume",
        "flat.nii": "flat.nii: a 2-D image of shape (32, 32); expected one 3-D volume",
        "notes.nii.gz": "notes.nii.gz: not a readable NIfTI file",
        "mixed": "mixed: 2 DICOM series in one folder ('AX FLAIR' (6 files), 'FLAIR' (6 files))",
        "empty": "empty: no DICOM image in this folder (1 other DICOM files)",
        "single": "single/",  # then the file: "...dcm: a single DICOM slice (2-D)"
    }
    assert sorted(errors) == sorted(expected)
    for name, message in expected.items():
        assert errors[name].startswith(str(tmp_path / "in" / message)), errors[name]
        assert "\n" not in errors[name]
    assert errors["single"].endswith(".dcm: a single DICOM slice (2-D); expected a volume")
    ok = {os.path.relpath(r["file"], tmp_path / "in") for r in rows if not r["error"]}
    # Sequences on other grids are resampled, or dropped where they cover too little.
    assert ok == {"good.nii.gz", "shapes/s_flair.nii.gz", "grids/g_flair.nii.gz"}
    assert re.search(
        r"pre dropped \(covers \d+% of the FLAIR's head\)", patients["shapes"]["notes"]
    )
    assert "post resampled onto the FLAIR's grid" in patients["grids"]["notes"]
    assert patients["good"]["error"] == "" and patients["fourd"]["error"] == errors["fourd.nii"]


def test_predictor_api_equals_mode_predict_and_takes_any_slice_size(tmp_path, model, scans):
    root, stacks = scans
    predictor = inference.Predictor.from_checkpoint(model)
    assert predictor.threshold == pytest.approx(0.4)  # the checkpoint's detection threshold
    _predict(model, root / "tif" / "P1", tmp_path / "work")
    expected = _tif_masks(tmp_path / "work" / "predict", "P1", 6)
    result = predictor.predict(stacks["P1"])
    np.testing.assert_array_equal(result.masks, expected)
    assert result.probabilities.shape == (6, 32, 32) and result.tumor_probabilities.shape == (6,)
    # Other sizes are resized in and out; a grey stack is a FLAIR-only scan.
    big = np.repeat(np.repeat(stacks["P1"], 2, axis=1), 2, axis=2)
    assert predictor.predict(big).masks.shape == (6, 64, 64)
    flair_only = predictor.predict(stacks["P1"][..., 1])
    copied = predictor.predict(np.repeat(stacks["P1"][..., 1:2], 3, axis=-1))
    np.testing.assert_array_equal(flair_only.probabilities, copied.probabilities)
    with pytest.raises(ValueError, match="slice 0: expected"):
        predictor.predict(stacks["P1"].astype(np.float32))


def test_group_sources_follows_the_naming_convention(tmp_path):
    names = [
        "a/A_flair.nii.gz",
        "a/A_t1.nii.gz",
        "a/A_t1ce.nii.gz",
        "a/A_t2.nii.gz",
        "a/A_seg.nii.gz",
        "b/B-t2f.nii.gz",
        "b/B-t1n.nii.gz",
        "b/B-t1c.nii.gz",
        "c/one.nii",
        "c/two.nii.gz",
        "d/D_FLAIR",
        "d/D_T1_post",
    ]
    found = volumes.group_sources([str(tmp_path / n) for n in names], str(tmp_path))
    # A series folder or file given as the root is a patient named by it.
    os.makedirs(tmp_path / "d" / "D_FLAIR")
    for root in (tmp_path / "d" / "D_FLAIR", tmp_path / "a" / "A_flair.nii.gz"):
        (alone,) = volumes.group_sources([str(root)], str(root))
        assert alone.name == root.name.removesuffix(".nii.gz")
    by_name = {
        v.name: {r: os.path.relpath(p, tmp_path) for r, p in v.sequences.items()} for v in found
    }
    assert by_name == {
        "a": {"flair": "a/A_flair.nii.gz", "pre": "a/A_t1.nii.gz", "post": "a/A_t1ce.nii.gz"},
        "b": {"flair": "b/B-t2f.nii.gz", "pre": "b/B-t1n.nii.gz", "post": "b/B-t1c.nii.gz"},
        "c/one": {"flair": "c/one.nii"},
        "c/two": {"flair": "c/two.nii.gz"},
        "d": {"flair": "d/D_FLAIR", "post": "d/D_T1_post"},
    }


def test_dicom_series_roles_come_from_their_descriptions_where_names_say_none(tmp_path):
    """A scanner's export (a folder per series, numbered): one patient, its FLAIR, T1 and
    T1 post by SeriesDescription and ContrastBolusAgent, the most axial of two post
    series; a T1 FLAIR is a T1; other series and a folder named by role keep theirs."""
    stack = np.zeros((2, 8, 8), np.uint8)
    series = {
        "exam/SE1": dict(description="AX T2 FLAIR"),
        "exam/SE2": dict(description="AX T1 FLAIR"),
        "exam/SE3": dict(description="AX T1 SE", contrast="GADOVIST"),
        "exam/SE4": dict(description="COR T1 +C", coronal=True),
        "exam/SE5": dict(description="AX DWI"),
        "exam/SE6": dict(description="3-plane localizer"),
        "siemens/7": dict(description="t2_tirm_tra_dark-fluid"),
        "siemens/8": dict(description="t1_se_tra pre-contrast"),
        "named/FLAIR": dict(description="whatever"),
        "named/9": dict(description="AX T1 C+"),
        "loose/1": dict(description="AX T2"),
        "loose/2": dict(description="AX T1"),
        "flairs/A": dict(description="AX FLAIR", study="1.2.4"),
        "flairs/B": dict(description="AX FLAIR", study="1.2.5"),
    }
    for name, tags in series.items():
        _write_dicom(stack, tmp_path / name, **tags)
    found = volumes.group_sources([str(tmp_path / n) for n in series], str(tmp_path))
    by_name = {
        v.name: ({r: os.path.relpath(p, tmp_path) for r, p in v.sequences.items()}, v.notes)
        for v in found
    }
    assert by_name == {
        "exam": (
            {"flair": "exam/SE1", "pre": "exam/SE2", "post": "exam/SE3"},
            (
                "flair from DICOM series 'AX T2 FLAIR'",
                "pre from DICOM series 'AX T1 FLAIR'",
                "post from DICOM series 'AX T1 SE', the most axial of 2",
            ),
        ),
        "siemens": (
            {"flair": "siemens/7", "pre": "siemens/8"},
            (
                "flair from DICOM series 't2_tirm_tra_dark-fluid'",
                "pre from DICOM series 't1_se_tra pre-contrast'",
            ),
        ),
        "named": (
            {"flair": "named/FLAIR", "post": "named/9"},
            ("post from DICOM series 'AX T1 C+'",),
        ),
        # No FLAIR among them: each a FLAIR-only patient, as before ("not named a FLAIR").
        "loose/1": ({"flair": "loose/1"}, ()),
        "loose/2": ({"flair": "loose/2"}, ()),
        # Two studies' series: two patients, however they are described.
        "flairs/A": ({"flair": "flairs/A"}, ()),
        "flairs/B": ({"flair": "flairs/B"}, ()),
    }


@pytest.mark.parametrize("flat", [False, True], ids=["folder_per_series", "one_folder"])
def test_a_scanners_dicom_export_predicts_as_its_named_series(tmp_path, model, scans, flat):
    """A CD export (DICOMDIR index, DICOM/ST1/SE1..6, roles only in the headers, a T2, a
    coronal T1 post and a dose report beside them), or the same files in one folder, gives
    the masks of the same series in named folders."""
    root, stacks = scans
    stack = stacks["P1"]
    export = tmp_path / "cd"
    study = export / "DICOM" / "ST1"

    def series(name):
        return study if flat else study / name

    _write_dicom(stack[..., 1], series("SE1"), description="AX FLAIR")
    _write_dicom(stack[..., 0], series("SE2"), description="AX T1")
    _write_dicom(stack[..., 2], series("SE3"), description="AX T1", contrast="gadobutrol")
    _write_dicom(stack[..., 0][::-1], series("SE4"), description="COR T1 +C", coronal=True)
    _write_dicom(255 - stack[..., 1], series("SE5"), description="AX T2")
    dose = Dataset()  # a dose report of the study: a series folder without images
    dose.file_meta = FileMetaDataset()
    dose.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dose.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # Dose SR
    dose.file_meta.MediaStorageSOPInstanceUID = dose.SOPInstanceUID = generate_uid()
    dose.SOPClassUID, dose.Modality = dose.file_meta.MediaStorageSOPClassUID, "SR"
    dose.StudyInstanceUID = "1.2.3"
    os.makedirs(series("SE6"), exist_ok=True)
    dose.save_as(series("SE6") / "IM1", enforce_file_format=True)
    index = Dataset()
    index.file_meta = FileMetaDataset()
    index.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory
    index.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    index.save_as(export / "DICOMDIR", enforce_file_format=True)
    rows, patients = _predict(model, export, tmp_path / "work", reframe=False)
    assert [r["error"] for r in rows] == [""]
    assert list(patients) == ["DICOM/ST1"]
    _, named = _predict(model, root / "dicom" / "P1", tmp_path / "named", reframe=False)
    assert patients["DICOM/ST1"]["notes"] == (
        "flair from DICOM series 'AX FLAIR'; pre from DICOM series 'AX T1'; "
        "post from DICOM series 'AX T1', the most axial of 2; " + named["P1"]["notes"]
    )
    ours = nib.load(tmp_path / "work" / "predict" / "DICOM" / "ST1_pred_mask.nii.gz")
    theirs = nib.load(tmp_path / "named" / "predict" / "P1_pred_mask.nii.gz")
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    np.testing.assert_allclose(ours.affine, theirs.affine)
    assert np.asarray(ours.dataobj).any()  # else equal masks would prove little


def test_to_uint8_keeps_8_bit_and_maps_other_types_by_their_range():
    x = np.array([[3, 7], [200, 9]], np.uint8)
    assert volumes.to_uint8(x, "x") is x
    np.testing.assert_array_equal(
        volumes.to_uint8(x.astype(np.int16) * 13 - 40, "x"), [[0, 5], [255, 8]]
    )
    with pytest.raises(errors.DataError, match="^x: 1 non-finite values"):
        volumes.to_uint8(np.array([1.0, np.inf]), "x")


def test_shifted_inputs_benchmark_scores_every_form(
    model, tiny_data, monkeypatch, capsys, tmp_path
):
    """The benchmark runs end to end on the tiny data: a Dice per patient and form, the
    Kaggle-form NIfTI scored as the .tif path, the summary in the JSON it writes."""
    monkeypatch.syspath_prepend(
        os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
    )
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # main() sets it for its own process
    import shifted_inputs

    forms = "kaggle_nifti,skull_stripped,oblique_208x256,sequences_other_grid"
    argv = ["shifted_inputs.py", "--data_dir", tiny_data, "--checkpoint", model]
    argv += ["--num_patients", "1", "--forms", forms, "--json", str(tmp_path / "out.json")]
    monkeypatch.setattr(sys, "argv", argv)
    shifted_inputs.main()
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith('{"form')]
    assert [r["form"] for r in rows] == ["tif", *forms.split(",")]
    assert all(0 <= r["dice"] <= 1 for r in rows)
    with open(tmp_path / "out.json") as f:
        summary = json.load(f)["summary"]
    assert summary["num_patients"] == 1
    assert summary["skull_stripped"]["notes"]["skull-stripped"] == 1
    assert "pre resampled onto the FLAIR's grid" in summary["sequences_other_grid"]["notes"]
    assert "oblique slices" in summary["oblique_208x256"]["notes"]
