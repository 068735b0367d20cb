"""Harmonising real volumes (`data/harmonise.py`, `volumes.read_volume`): sequences on
other grids, reframing and mapping back, and each note of patients.csv.

Volumes are made from a shared LGG patient (skipped where ../shared is not beside the
checkout), written as NIfTI with the geometry each form would have.
"""

import os
import re

import nibabel as nib
import numpy as np
import pytest
import tifffile
from scipy import ndimage
from test_volumes import _write_dicom

from resunet_jax.data import harmonise, volumes

PATIENT = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "lgg", "kaggle_3m",
    "TCGA_CS_4941_19960909",
)  # fmt: skip
SPACING = (0.9, 0.9, 4.0)  # column, row, slice (mm), as assumed for the .tif slices


@pytest.fixture(scope="module")
def patient():
    """([Z, 256, 256, 3] uint8 slices, [Z, 256, 256] bool reference) of one patient."""
    if not os.path.isdir(PATIENT):
        pytest.skip("the shared LGG data are not beside the checkout")
    names = [n for n in os.listdir(PATIENT) if n.endswith(".tif") and "_mask" not in n]
    names.sort(key=lambda n: int(re.findall(r"_(\d+)\.tif$", n)[0]))
    images = np.stack([tifffile.imread(os.path.join(PATIENT, n)) for n in names])
    masks = np.stack(
        [tifffile.imread(os.path.join(PATIENT, n.replace(".tif", "_mask.tif"))) > 0 for n in names]
    )
    return images, masks


def _save(stack, path, affine=None, dtype=None):
    """Saves [Z, H, W] Kaggle-layout slices as NIfTI (`volumes.slices_to_volume`), on
    `affine` if given."""
    data, own = volumes.slices_to_volume(stack, SPACING)
    image = nib.Nifti1Image(data.astype(dtype or data.dtype), own if affine is None else affine)
    nib.save(image, str(path))
    return image


def _grid_like(image, shape, degrees=0.0, shift_mm=(0, 0, 0)):
    """The affine of a `shape` grid with `image`'s voxel sizes, centred where `image`'s
    centre is, rotated `degrees` about the left-right axis and shifted (world mm)."""
    centre = image.affine @ np.append((np.array(image.shape[:3]) - 1) / 2, 1)
    a = np.radians(degrees)
    rigid = np.eye(4)
    rigid[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    affine = rigid @ image.affine
    affine[:3, 3] = 0
    affine[:3, 3] = centre[:3] + np.asarray(shift_mm) - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


def _onto(image, shape, affine, order=1):
    """`image` resampled onto (shape, affine), an independent copy of what a scanner's
    other series would be."""
    from nibabel import processing

    return processing.resample_from_to(image, (shape, affine), order=order, mode="nearest")


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_sequences_on_other_grids_are_resampled_onto_the_flairs(tmp_path, patient):
    images, _ = patient
    flair = _save(images[..., 1], tmp_path / "P_flair.nii.gz")
    for channel, role in ((0, "t1"), (2, "t1ce")):
        own = _save(images[..., channel], tmp_path / f"own_{role}.nii.gz")
        # Another grid: 240 x 240 x (Z + 4), rotated 8 degrees and shifted 7 mm.
        shape = (240, 240, images.shape[0] + 4)
        other = _onto(own, shape, _grid_like(flair, shape, 8, (7, -5, 3)))
        nib.save(other, str(tmp_path / f"P_{role}.nii.gz"))
        os.remove(tmp_path / f"own_{role}.nii.gz")
    (source,) = volumes.group_sources(sorted(map(str, tmp_path.iterdir())), str(tmp_path))
    volume = volumes.read_volume(source)
    assert volume.notes == (
        "pre resampled onto the FLAIR's grid",
        "post resampled onto the FLAIR's grid",
    )
    assert volume.frame.identity  # a Kaggle-form FLAIR is its own model grid
    np.testing.assert_array_equal(volume.images[..., 1], images[..., 1])
    head = volumes._axial_slices(harmonise.measure_head(np.asarray(flair.dataobj)), flair.affine)
    head = ndimage.binary_erosion(head, np.ones((1, 15, 15), bool))  # away from the FOV's edge
    for channel in (0, 2):  # back where they were, to within interpolation
        error = np.abs(volume.images[..., channel].astype(float) - images[..., channel])[head]
        # Two linear interpolations across 4 mm slices blur; a 7 mm misplacement is ~3x worse.
        assert np.median(error) <= 4 and np.mean(error) <= 9, (channel, np.mean(error))


def test_a_volume_on_another_grid_is_reframed_and_its_results_map_back(tmp_path, patient):
    """Resampled to 1 mm on a 240 x 240 grid (as BraTS), the head is brought back to the
    training frame; a map carried there and back is the same map."""
    images, reference = patient
    kaggle = _save(images[..., 1], tmp_path / "kaggle.nii.gz")
    shape = (240, 240, images.shape[0] * 4)
    affine = _grid_like(kaggle, shape)
    affine[:3, :3] = np.diag(np.sign(np.diag(kaggle.affine[:3, :3])))  # 1 mm voxels
    affine[:3, 3] = (kaggle.affine @ np.append((np.array(kaggle.shape) - 1) / 2, 1))[:3]
    affine[:3, 3] -= affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    thin = _onto(kaggle, shape, affine)
    nib.save(thin, str(tmp_path / "thin_flair.nii.gz"))
    reference_thin = _onto(
        nib.Nifti1Image(volumes.slices_to_volume(reference.astype(np.float32))[0], kaggle.affine),
        thin.shape,
        affine,
    )
    (source,) = volumes.group_sources([str(tmp_path / "thin_flair.nii.gz")], str(tmp_path))
    volume = volumes.read_volume(source)
    frame = volume.frame
    assert not frame.identity and frame.shape == (256, 256, images.shape[0] * 4)
    # The head (229 mm) is inside the training heads' range at 1 mm: padded, not scaled.
    assert "reframed to 256 x 256 at 1.00 mm pixels" in volume.notes, volume.notes
    head = harmonise.measure_head(
        np.asarray(
            harmonise.canonical(
                nib.Nifti1Image(volume.images[..., 1].transpose(2, 1, 0)[::-1, ::-1], frame.affine)
            ).dataobj
        )
    )
    rows = np.flatnonzero(head.any(axis=(0, 2)))
    assert abs((rows[-1] - rows[0] + 1) - 255 * 0.9) <= 6  # edges blur in resampling
    # The reference on the model grid (as the model would see it) and back.
    on_grid = harmonise.resample(
        nib.Nifti1Image(np.asarray(reference_thin.dataobj, np.float32), affine), frame
    )
    slices = volumes._axial_slices(on_grid, frame.affine)
    back = volume.to_input_slices(slices) >= 0.5
    truth = volumes._axial_slices(np.asarray(reference_thin.dataobj), affine) >= 0.5
    assert back.shape == truth.shape and _dice(back, truth) > 0.95


def test_a_kaggle_form_volume_is_read_as_it_is(tmp_path, patient):
    images, _ = patient
    for channel, role in enumerate(("t1", "flair", "t1ce")):
        _save(images[..., channel], tmp_path / f"P_{role}.nii.gz")
    (source,) = volumes.group_sources(sorted(map(str, tmp_path.iterdir())), str(tmp_path))
    volume = volumes.read_volume(source)
    assert volume.frame.identity and volume.notes == ()
    np.testing.assert_array_equal(volume.images, images)


def _notes(tmp_path, name, stack, affine=None, dtype=None):
    _save(stack, tmp_path / name, affine, dtype)
    (source,) = volumes.group_sources([str(tmp_path / name)], str(tmp_path / name))
    return volumes.read_volume(source).notes


def test_notes_say_skull_stripped_and_not_for_whole_head_scans(tmp_path, patient):
    images, _ = patient
    flair = images[..., 1]
    assert "skull-stripped" not in _notes(tmp_path, "head_flair.nii.gz", flair)
    head = volumes._axial_slices(
        harmonise.measure_head(volumes.slices_to_volume(flair)[0]), np.diag([-1, -1, 1, 1])
    )
    brain = ndimage.binary_erosion(head, np.ones((1, 25, 25), bool))
    notes = _notes(tmp_path, "brain_flair.nii.gz", np.where(brain, flair, 0))
    assert "skull-stripped" in notes
    # z-scored (float, background negative) is stripped all the same.
    zscored = (np.where(brain, flair, 0) - 40.0) / 25.0
    assert "skull-stripped" in _notes(tmp_path, "z_flair.nii.gz", zscored, dtype=np.float32)


def test_notes_name_a_volume_not_named_a_flair(tmp_path, patient):
    flair = patient[0][..., 1]
    assert _notes(tmp_path, "P_flair.nii.gz", flair) == ()
    notes = _notes(tmp_path, "P_t1.nii.gz", flair)
    assert notes == ("not named a FLAIR (P_t1.nii.gz); the model reads FLAIR",)
    _write_dicom(flair[:4], tmp_path / "series3", description="AX T2 FLAIR")
    _write_dicom(flair[:4], tmp_path / "series4", description="AX T1 POST")
    for folder, expected in (("series3", ()), ("series4", ("series 'AX T1 POST'",))):
        source = volumes.VolumeInput(folder, {"flair": str(tmp_path / folder)})
        notes = [n for n in volumes.read_volume(source).notes if n.startswith("not named")]
        assert len(notes) == len(expected) and all(
            e in n for e, n in zip(expected, notes, strict=True)
        )


def test_a_head_outside_the_training_range_is_scaled_into_it():
    """0.5 mm pixels on 512 x 512: the head spans 460 pixels, brought to 252 (the 90th
    percentile) of one square pixel size; a centred head stays centred."""
    image = nib.Nifti1Image(np.zeros((512, 512, 3), np.float32), np.diag([-0.5, -0.5, 5, 1]))
    head = np.zeros((512, 512, 3), bool)
    head[76:436, 26:486] = True  # 360 wide, 460 long (rows: the second axis)
    frame = harmonise.frame_for(image, head, skull_stripped=False)
    assert not frame.identity and frame.shape == (256, 256, 3)
    np.testing.assert_allclose(frame.pixel_mm, 460 * 0.5 / harmonise.HEAD_EXTENT[1])
    np.testing.assert_allclose(np.abs(np.diag(frame.affine)[:2]), frame.pixel_mm)
    # The brain of a stripped volume is framed as its head: scaled by BRAIN_TO_HEAD.
    stripped = harmonise.frame_for(image, head, skull_stripped=True)
    np.testing.assert_allclose(
        stripped.pixel_mm, 460 * 0.5 / harmonise.BRAIN_TO_HEAD / harmonise.HEAD_EXTENT[1]
    )
    # The head's centre (voxel 255.5, 255.5) lands on the model grid's centre.
    centre = np.linalg.solve(frame.affine, image.affine @ [255.5, 255.5, 1, 1])
    np.testing.assert_allclose(centre[:2], [127.5, 127.5], atol=0.51)


def test_notes_name_thick_oblique_and_sagittal_slices(tmp_path, patient):
    flair = patient[0][..., 1]
    _, affine = volumes.slices_to_volume(flair, SPACING)
    thick = affine @ np.diag([1.0, 1.0, 2.0, 1.0])  # 8 mm apart
    assert _notes(tmp_path, "thick_flair.nii.gz", flair, thick) == ("thick slices (8.0 mm)",)
    a = np.radians(12)
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    tilted = tilt @ affine
    assert "oblique slices (tilted 12 degrees)" in _notes(
        tmp_path, "tilt_flair.nii.gz", flair, tilted
    )
    # Stored sagittal: the slice axis is left-right.
    data, _ = volumes.slices_to_volume(flair, SPACING)
    sagittal = nib.Nifti1Image(data.transpose(2, 1, 0), affine[:, [2, 1, 0, 3]])
    nib.save(sagittal, str(tmp_path / "sag_flair.nii.gz"))
    (source,) = volumes.group_sources([str(tmp_path / "sag_flair.nii.gz")], str(tmp_path))
    assert "sagittal slices, cut into axial ones" in volumes.read_volume(source).notes
