"""NIfTI volumes and DICOM series in, NIfTI masks and probability maps out.

Inputs (found by `predict.find_inputs`):
- a NIfTI file (`.nii`, `.nii.gz`) holds one 3-D volume of one sequence;
- a DICOM series is a folder holding the files (`.dcm`, or any file with the DICOM
  preamble) of one series; other files in it, and a media index (`DICOMDIR`), are
  ignored. A folder holding several series of one study (a flat export) is one patient
  whose sequences are chosen by description, as below; several studies in one folder
  are refused.

Naming convention for several sequences of one patient: the NIfTI files and DICOM series
folders side by side in one folder are one patient when one of them is a FLAIR. A
source's role is read from its name, split at every character that is not a letter or a
digit (case-insensitive; `+C` and `C+` read as `post`), first match wins (`_role`):
- FLAIR: a part `flair` or `t2f` (`P1_flair.nii.gz`, BraTS 2023 `*-t2f.nii.gz`), and no
  T1 part (a T1-weighted FLAIR, GE's `AX T1 FLAIR`, is a T1);
- post-contrast: `post`, `t1c`, `t1ce`, `t1gd`, `gd`, `gad`, `contrast`, and no `pre`
  (`P1_t1ce.nii.gz`, `P1_T1_post/`, `AX T1 +C`);
- pre-contrast: `pre`, `t1`, `t1n` (`P1_t1.nii.gz`, BraTS 2023 `*-t1n.nii.gz`).
A DICOM series folder whose name gives no role takes it from its SeriesDescription,
read the same way, a T1 with a ContrastBolusAgent being post-contrast: so a scanner's
export (a folder per series, named `SE000003` or `5`) is one patient. Where such
descriptions name a role several times (an axial and a coronal T1 post), the series
closest to axial is taken, then the one with the most files; a note says which. Other
sources in such a folder (T2, DWI, localisers, segmentations) are skipped. Anywhere
else, each source is a FLAIR-only patient. Names with a part `mask`, `seg` or `label` are ground
truth and skipped, as `*_mask.tif` slices are. A missing pre- or post-contrast is filled
with the FLAIR, as the LGG data fill a sequence that was not acquired (the shipped model
then routes the slices to its network for scans without contrast).

Orientation: every volume is brought to RAS+ axes by axis permutations and flips only
(`nibabel.orientations`, the closest canonical orientation: no resampling, an oblique
scan keeps its tilt), then cut into axial slices laid out as the Kaggle .tif slices are:
rows anterior to posterior, slices inferior to superior (slice 1 is the lowest), as the
images show, and columns patient right to left (the radiological convention of DICOM
axial images: the .tif files carry no orientation and left and right cannot be told from
the images; the model trains with left-right flips). `slices_to_volume` writes a stack of
Kaggle slices with that convention, and reading it back gives the stack exactly.
Predictions go back to the input's own axes and are written with its affine and header,
so they overlay the input in any viewer. The in-plane grid is resized to the model's
input as any .tif slice is (the LGG slices are 256 x 256 whole-head axial slices).

Intensities: the Kaggle slices are 8-bit per volume, each sequence scaled from its
minimum to near its maximum, with almost no voxels clipped (docs/volumes.md): min..max
scaling, not clipping at a percentile. So an 8-bit (uint8) volume is taken as it is, like
a uint8 .tif slice, and
any other volume is mapped linearly from its minimum..maximum to 0..255 per volume and
sequence (`to_uint8`), which makes the result independent of the scanner's linear
scaling.
"""

import collections
import dataclasses
import os
import re

import nibabel as nib
import numpy as np
from absl import logging
from nibabel import orientations

from resunet_jax import errors
from resunet_jax.data import harmonise

# Channel order of a model input slice, as in the LGG .tif files.
SEQUENCES = ("pre", "flair", "post")
# Name parts that give a source's role (`_role`; the module docstring).
_FLAIR = {"flair", "t2f", "fluid"}  # "fluid": Siemens' "t2_tirm_tra_dark-fluid"
_POST = {"post", "t1c", "t1ce", "t1gd", "gd", "gad", "contrast"}
_PRE = {"pre", "t1", "t1n"}
# A T1-weighted FLAIR (GE's "AX T1 FLAIR", common at 3 T) is a T1, not the FLAIR.
_T1 = {"t1", "t1n", "t1c", "t1ce", "t1gd"}
# Scanners' post-contrast shorthand ("AX T1 +C", "T1 C+"), read as the part "post".
_PLUS_C = re.compile(r"(?<![a-z0-9])(\+c|c\+)(?![a-z0-9])")
_GROUND_TRUTH = {"mask", "seg", "label", "labels"}
_NIFTI = (".nii", ".nii.gz")
# The training slices are axial, 3..6.5 mm apart; beyond these, a note says so.
THICK_SLICES_MM = 6.5
OBLIQUE_DEGREES = 5.0
# Axis codes of the canonical orientation (nibabel's RAS+).
_CANONICAL = orientations.axcodes2ornt("RAS")


@dataclasses.dataclass(frozen=True)
class VolumeInput:
    """One patient's volume sources.

    Attributes:
        name: the patient's output name (its path below the input root, no extension).
        sequences: role ("flair", "pre", "post") -> NIfTI file or DICOM series folder;
            always with "flair".
        problem: why the sources cannot make a volume ("" if they can); `read_volume`
            raises it, so the run's other patients are still predicted.
        notes: how the sequences were found where their names did not say (roles read
            from DICOM series descriptions), for patients.csv.
        series: role -> SeriesInstanceUID, for sequences that are one series of a folder
            holding several.
    """

    name: str
    sequences: dict
    problem: str = ""
    notes: tuple = ()
    series: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Volume:
    """A patient's volume as axial model slices, and how to map results back.

    Attributes:
        source: the FLAIR's file or folder (named in messages and reports).
        images: [Z, H, W, 3] uint8 axial slices (pre-contrast, FLAIR, post-contrast) on
            the model grid (`frame`), in the Kaggle layout (see the module docstring).
        affine: [4, 4] voxel-to-RAS-mm affine of the input grid (the FLAIR's).
        header: the FLAIR's NIfTI header, None for DICOM.
        shape: the input grid's shape (X, Y, Z as stored).
        voxel_ml: one voxel's volume in mL, None when the unit is unknown.
        frame: the model grid `images` are on (`harmonise.Frame`); `to_input_slices`
            maps results from it back onto the FLAIR's slices.
        notes: what the input is where it differs from the training data (skull-stripped,
            not named a FLAIR, thick or oblique slices, a sequence resampled or dropped,
            reframed), for patients.csv.
    """

    source: str
    images: np.ndarray
    affine: np.ndarray
    header: object
    shape: tuple
    voxel_ml: float | None
    frame: harmonise.Frame
    notes: tuple = ()

    def to_input_slices(self, values: np.ndarray) -> np.ndarray:
        """[Z, FRAME, FRAME] maps on the model grid -> [Z, H, W] on the FLAIR's own axial
        slices (Kaggle layout, as `to_input_grid` takes them)."""
        return harmonise.to_input_slices(values, self.frame)

    def to_input_grid(self, slices: np.ndarray) -> np.ndarray:
        """[Z, H, W] per-slice results (as `images`) -> the input's array layout."""
        canonical = np.asarray(slices)[:, ::-1, ::-1].transpose(2, 1, 0)
        back = orientations.ornt_transform(_CANONICAL, orientations.io_orientation(self.affine))
        return orientations.apply_orientation(canonical, back)

    def write_nifti(self, volume: np.ndarray, path: str):
        """Writes `volume` (input layout, `to_input_grid`) as NIfTI with the input's
        affine and header (data type and scaling set for `volume`)."""
        if self.header is not None:
            image = nib.Nifti1Image(volume, self.affine, self.header.copy())
        else:  # from DICOM: the scanner's coordinates, in mm
            image = nib.Nifti1Image(volume, None)
            image.set_sform(self.affine, code="scanner")
            image.set_qform(self.affine, code="scanner")
            image.header.set_xyzt_units("mm")
        image.set_data_dtype(volume.dtype)
        image.header.set_slope_inter(1.0, 0.0)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        nib.save(image, path)


def is_ground_truth(path: str) -> bool:
    """Whether a file's name marks it as a mask (`*_mask.tif`, `*_seg.nii.gz`, ...)."""
    return bool(_name_parts(path) & _GROUND_TRUTH)


def is_nifti(path: str) -> bool:
    return path.lower().endswith(_NIFTI)


def is_dicom(path: str) -> bool:
    """A `.dcm` file, or a file with the DICOM preamble ("DICM" at byte 128); not a media
    index (`DICOMDIR`, the name the standard gives it), which holds no image."""
    if os.path.basename(path).upper() == "DICOMDIR":
        return False
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _name_parts(path: str) -> set:
    name = os.path.basename(os.path.normpath(path)).lower()
    for ext in _NIFTI:
        name = name.removesuffix(ext)
    return _parts(name)


def _parts(text: str) -> set:
    return set(re.split(r"[^a-z0-9]+", _PLUS_C.sub(" post ", text.lower())))


def _role(parts: set) -> str | None:
    if parts & _FLAIR and not parts & _T1:
        return "flair"
    if parts & _POST and "pre" not in parts:  # "T1 pre-contrast", "T1 PRE GAD": pre
        return "post"
    return "pre" if parts & (_PRE | _T1) else None


def role_of(path: str) -> str | None:
    """A source's sequence ("flair", "post", "pre") by its name, or None."""
    return _role(_name_parts(path))


@dataclasses.dataclass(frozen=True)
class _Series:
    """What a DICOM series' headers say of its role (`_series`)."""

    role: str | None
    study: str = ""  # StudyInstanceUID; "" where unreadable
    uid: str = ""  # SeriesInstanceUID
    description: str = ""
    axial: float = 0.0  # |cosine| between the slice normal and the head's axis
    num_files: int = 0


_HEADER = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesDescription",
    "ContrastBolusAgent",
    "ImageOrientationPatient",
    "Rows",
)


def _series(folder: str) -> list[_Series]:
    """The image series in a DICOM folder and the role each one's first header gives
    (module docstring); one _Series(None) where a file is unreadable or none is an image."""
    import pydicom  # only for DICOM input

    firsts, counts, study = {}, collections.Counter(), ""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or not is_dicom(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER))
            iop = np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
        except Exception:  # read_volume names a damaged file when the series is read
            return [_Series(None)]
        study = study or str(ds.get("StudyInstanceUID", ""))
        if "Rows" in ds:  # not a report or a presentation state
            uid = str(ds.get("SeriesInstanceUID", ""))
            counts[uid] += 1
            firsts.setdefault(uid, (ds, iop))
    found = []
    for uid, (ds, iop) in firsts.items():
        description = str(ds.get("SeriesDescription", ""))
        role = _role(_parts(description))
        if role == "pre" and str(ds.get("ContrastBolusAgent", "")).strip():
            role = "post"
        axial = float(abs(np.cross(iop[:3], iop[3:])[2]))  # unit direction cosines
        series_study = str(ds.get("StudyInstanceUID", ""))
        found.append(_Series(role, series_study, uid, description, axial, counts[uid]))
    return found or [_Series(None, study)]


def _one_study(series) -> bool:
    studies = {s.study for s in series}
    return len(studies) == 1 and "" not in studies


def _by_description(described: dict, taken=()) -> tuple[dict, list]:
    """The series each role not in `taken` is read from, by description.

    Args:
        described: key (a folder, or a series UID within one folder) -> _Series.
        taken: roles already given by names.

    Returns:
        ({role: key}, the notes saying which series became which role).
    """
    chosen, notes = {}, []
    for role in ("flair", "pre", "post"):
        candidates = [k for k, d in described.items() if d.role == role]
        if role in taken or not candidates:
            continue
        # The key last: a deterministic choice between equal series.
        best = max(candidates, key=lambda k: (described[k].axial, described[k].num_files, k))
        chosen[role] = best
        others = "" if len(candidates) == 1 else f", the most axial of {len(candidates)}"
        notes.append(f"{role} from DICOM series {described[best].description!r}{others}")
    return chosen, notes


def output_name(path: str, root: str) -> str:
    """A patient's output name: `path` below the input root without its NIfTI extension
    (the root's own name when `path` is the root folder or holds it: a series folder
    given as the root is grouped under its parent)."""
    base = root if os.path.isdir(root) else os.path.dirname(root)
    rel = os.path.relpath(path, base)
    if rel == "." or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        rel = os.path.basename(os.path.abspath(root))
    for ext in _NIFTI:
        if rel.lower().endswith(ext):
            return rel[: -len(ext)]
    return rel


def group_sources(sources: list[str], root: str) -> list[VolumeInput]:
    """Groups NIfTI files and DICOM series folders into patients (module docstring).

    Args:
        sources: the NIfTI files and DICOM series folders found under `root`.
        root: the input root (a folder, or a file whose folder is the root).

    Returns:
        One VolumeInput per patient, sorted by name.
    """
    by_parent = {}
    for source in sources:
        if not is_ground_truth(source):
            by_parent.setdefault(os.path.dirname(os.path.normpath(source)), []).append(source)
    patients = []
    for parent, members in by_parent.items():
        series = {m: _series(m) for m in members if os.path.isdir(m)}
        # A folder holding several series (a flat export) is a patient of its own.
        for folder in [m for m, found in series.items() if len(found) > 1]:
            members.remove(folder)
            patients.append(_study_in_one_folder(folder, series.pop(folder), root))
        if not members:
            continue
        named = {m: role_of(m) for m in members}
        # Series are one patient's by their headers only where all of the folder's
        # sources are DICOM series of one study (not a folder of patients' FLAIRs).
        one_study = len(series) == len(members) and _one_study(s[0] for s in series.values())
        described = {m: s[0] for m, s in series.items() if one_study and named[m] is None}
        if not any(r == "flair" for r in named.values()) and not any(
            d.role == "flair" for d in described.values()
        ):
            patients += [VolumeInput(output_name(m, root), {"flair": m}) for m in members]
            continue
        roles, problem = {}, ""
        for member in sorted(members):
            role = named[member]
            if role in roles:
                problem = f"{member}: a second {role} volume in its folder (and {roles[role]})"
            elif role:
                roles[role] = member
        chosen, notes = _by_description(described, roles)
        patients.append(
            VolumeInput(output_name(parent, root), roles | chosen, problem, tuple(notes))
        )
    return sorted(patients, key=lambda p: p.name)


def _study_in_one_folder(folder: str, found: list, root: str) -> VolumeInput:
    """A folder holding several DICOM series: one patient with its sequences by series
    description where they are of one study and one is a FLAIR; else its own FLAIR-only
    source, which `read_volume` refuses naming the series."""
    chosen, notes = _by_description({s.uid: s for s in found}) if _one_study(found) else ({}, [])
    if "flair" not in chosen:
        return VolumeInput(output_name(folder, root), {"flair": folder})
    sequences = {role: folder for role in chosen}
    return VolumeInput(output_name(folder, root), sequences, "", tuple(notes), chosen)


def to_uint8(image: np.ndarray, path: str) -> np.ndarray:
    """uint8 as it is; any other integer or float array mapped from its min..max to 0..255.

    Raises:
        errors.DataError: an unsupported pixel type or non-finite values (naming `path`).
    """
    if image.dtype == np.uint8:
        return image
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise errors.DataError(f"{path}: unsupported pixel type {image.dtype}")
    image = image.astype(np.float64)
    # A NaN would cast to an arbitrary uint8 value and an inf spoil the range, so both
    # are errors rather than silently wrong inputs.
    bad = int((~np.isfinite(image)).sum())
    if bad:
        raise errors.DataError(f"{path}: {bad} non-finite values (NaN or inf)")
    lo, hi = image.min(), image.max()
    return np.round((image - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)).astype(np.uint8)


def _read_nifti(path: str):
    """(data [X, Y, Z] as stored, scaled by the header's slope; affine; header; "")."""
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as e:  # nibabel raises many types for damaged or foreign files
        raise errors.DataError(
            f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})"
        ) from e
    return data, image.affine, image.header, ""


def _read_dicom(folder: str, series_uid: str | None = None):
    """(data [columns, rows, slices] in slice order; RAS affine; None; its
    SeriesDescription) of the folder's one DICOM series (or of `series_uid` in it).

    Raises:
        errors.DataError: unreadable files, no image, several series (with no
            `series_uid`), multi-frame images,
            slices of different size or orientation, or uneven slice positions.
    """
    import pydicom  # only for DICOM input

    images, others = [], 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or not is_dicom(path):
            continue
        try:  # pixels deferred: those of a folder's other series are never read
            ds = pydicom.dcmread(path, defer_size="64 KB")
        except Exception as e:  # pydicom raises many types for damaged files
            raise errors.DataError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from e
        if "PixelData" in ds and series_uid in (None, ds.get("SeriesInstanceUID", "")):
            images.append((path, ds))
        else:
            others += 1
    if not images:
        raise errors.DataError(
            f"{folder}: no DICOM image in this folder ({others} other DICOM files)"
        )
    series = {}
    for _, ds in images:
        series.setdefault(ds.get("SeriesInstanceUID", ""), []).append(ds)
    if len(series) > 1:
        described = ", ".join(
            f"{s[0].get('SeriesDescription', '?')!r} ({len(s)} files)"
            for s in sorted(
                series.values(), key=lambda s: (-len(s), s[0].get("SeriesDescription", ""))
            )
        )
        raise errors.DataError(
            f"{folder}: {len(series)} DICOM series in one folder ({described}), of several "
            "studies or none described as a FLAIR; put each series in a folder of its own"
        )
    first_path, first = images[0]
    if int(first.get("NumberOfFrames", 1)) > 1:
        raise errors.DataError(
            f"{first_path}: a multi-frame DICOM image; convert the series to NIfTI "
            "(dcm2niix) and predict on that"
        )
    if len(images) < 2:
        raise errors.DataError(f"{first_path}: a single DICOM slice (2-D); expected a volume")

    def geometry(path, ds):
        try:
            iop = np.asarray(ds.ImageOrientationPatient, np.float64)
            return iop, np.asarray(ds.ImagePositionPatient, np.float64), ds.PixelSpacing
        except AttributeError as e:
            raise errors.DataError(f"{path}: DICOM image without its geometry ({e})") from e

    iop, _, spacing = geometry(*images[0])
    normal = np.cross(iop[:3], iop[3:])
    positions, pixels = [], []
    for path, ds in images:
        this_iop, position, this_spacing = geometry(path, ds)
        if (
            not np.allclose(this_iop, iop, atol=1e-4)
            or (ds.Rows, ds.Columns) != (first.Rows, first.Columns)
            or not np.allclose(np.asarray(this_spacing, float), np.asarray(spacing, float))
        ):
            raise errors.DataError(
                f"{path}: slice size, orientation or pixel spacing differs from {first_path}"
            )
        try:
            array = ds.pixel_array
        except Exception as e:
            raise errors.DataError(
                f"{path}: DICOM pixel data not decodable ({type(e).__name__}: {e})"
            ) from e
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        if (slope, intercept) != (1.0, 0.0):
            array = array * slope + intercept
        positions.append(position)
        pixels.append(array)
    order = np.argsort([p @ normal for p in positions], kind="stable")
    positions = np.asarray(positions)[order]
    gaps = np.diff(positions @ normal)
    if gaps.min() <= 1e-3 or gaps.max() > 1.1 * gaps.min():
        raise errors.DataError(
            f"{folder}: DICOM slice positions are repeated or unevenly spaced "
            f"({gaps.min():.3f}..{gaps.max():.3f} mm apart)"
        )
    data = np.stack([pixels[i] for i in order]).transpose(2, 1, 0)  # [columns, rows, slices]
    row_spacing, column_spacing = (float(s) for s in spacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * column_spacing  # along a row: the column index grows
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    lps[:3, 3] = positions[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> RAS
    return data, ras, None, str(first.get("SeriesDescription", ""))


def _read_source(path: str, series_uid: str | None = None):
    """(data [X, Y, Z], affine, NIfTI header or None, DICOM SeriesDescription or "") of
    a NIfTI file or a DICOM folder's series (its only one, or `series_uid`)."""
    data, affine, header, description = (
        _read_dicom(path, series_uid) if os.path.isdir(path) else _read_nifti(path)
    )
    if data.ndim == 4 and data.shape[3] == 1:  # a 3-D volume stored with a unit 4th axis
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 2:
        raise errors.DataError(
            f"{path}: a {data.ndim}-D image of shape {data.shape}; expected one 3-D volume "
            "per sequence (split 4-D series; a single slice is not a volume)"
        )
    return data, affine, header, description


def _voxel_ml(affine, header) -> float | None:
    """One voxel's volume in mL; None when the header says the unit is not mm or m."""
    unit = header.get_xyzt_units()[0] if header is not None else "mm"
    # NIfTI's "unknown" is read as mm, as every viewer does.
    per_mm3 = {"mm": 1e-3, "unknown": 1e-3, "meter": 1e6, "micron": 1e-12}.get(unit)
    return None if per_mm3 is None else float(abs(np.linalg.det(affine[:3, :3]))) * per_mm3


def _axial_slices(data: np.ndarray, affine) -> np.ndarray:
    """[X, Y, Z] volume (any axis order) -> [Z, H, W] axial slices in the Kaggle layout."""
    to_canonical = orientations.ornt_transform(orientations.io_orientation(affine), _CANONICAL)
    canonical = orientations.apply_orientation(data, to_canonical)  # RAS+
    # Rows anterior first, columns patient right first, slices inferior first.
    return canonical.transpose(2, 1, 0)[:, ::-1, ::-1]


def _geometry_notes(affine) -> list[str]:
    """Notes on the FLAIR's slices where they differ from the training slices (axial,
    3..6.5 mm apart): thick, non-axial or oblique slices."""
    notes = []
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    slice_axis = "RAS"[int(np.argmax(np.abs(normal)))]
    if slice_axis != "S":
        plane = {"R": "sagittal", "A": "coronal"}[slice_axis]
        notes.append(f"{plane} slices, cut into axial ones")
    thickness = float(np.linalg.norm(affine[:3, 2]))
    if thickness > THICK_SLICES_MM:
        notes.append(f"thick slices ({thickness:.1f} mm)")
    tilt = np.degrees(np.arccos(np.abs(normal).max() / np.linalg.norm(normal)))
    if tilt > OBLIQUE_DEGREES:
        notes.append(f"oblique slices (tilted {tilt:.0f} degrees)")
    return notes


def read_volume(source: VolumeInput, reframe: bool = True) -> Volume:
    """Reads a patient's sequences onto one model grid (`harmonise`) as [Z, H, W, 3]
    uint8 model slices (missing or dropped sequences filled with the FLAIR).

    Args:
        source: the patient's sources.
        reframe: bring the FLAIR's slices to the training frame (pixel size and head
            position, `harmonise.frame_for`); False keeps its own in-plane grid (the
            other sequences are still resampled onto it).

    Raises:
        errors.DataError: naming the file and the problem.
    """
    if source.problem:
        raise errors.DataError(source.problem)
    flair_path = source.sequences["flair"]
    flair, affine, header, description = _read_source(flair_path, source.series.get("flair"))
    flair = harmonise.background_to_minimum(flair)
    flair_image = harmonise.canonical(nib.Nifti1Image(to_uint8(flair, flair_path), affine))
    head = harmonise.measure_head(np.asarray(flair_image.dataobj))
    notes = list(source.notes)
    stripped = harmonise.is_skull_stripped(np.asarray(flair_image.dataobj), head)
    if stripped:
        notes.append("skull-stripped")
    if role_of(flair_path) != "flair" and _role(_parts(description)) != "flair":
        named = f"{os.path.basename(os.path.normpath(flair_path))}" + (
            f", series {description!r}" if description else ""
        )
        notes.append(f"not named a FLAIR ({named}); the model reads FLAIR")
    notes += _geometry_notes(affine)
    frame = harmonise.frame_for(flair_image, head, stripped, reframe)
    if not frame.identity and reframe:
        notes.append(
            f"reframed to {harmonise.FRAME} x {harmonise.FRAME} at {frame.pixel_mm:.2f} mm pixels"
        )
    channels = {"flair": harmonise.resample(flair_image, frame)}
    head_on_grid = harmonise.measure_head(channels["flair"])
    for role in ("pre", "post"):
        path = source.sequences.get(role)
        if path is None:
            continue
        data, this_affine = _read_source(path, source.series.get(role))[:2]
        data = harmonise.background_to_minimum(data)
        image = harmonise.canonical(nib.Nifti1Image(to_uint8(data, path), this_affine))
        same_grid = data.shape == flair.shape and np.allclose(this_affine, affine, atol=1e-3)
        if not same_grid:
            share = harmonise.covered_share(image, frame, head_on_grid)
            if share < harmonise.MIN_COVERAGE:
                logging.warning(
                    "%s: covers %.0f%% of the FLAIR's head; predicting without it",
                    path,
                    share * 100,
                )
                notes.append(f"{role} dropped (covers {share:.0%} of the FLAIR's head)")
                continue
            notes.append(f"{role} resampled onto the FLAIR's grid")
        channels[role] = harmonise.resample(image, frame)
    slices = {
        role: _axial_slices(np.round(v).astype(np.uint8), frame.affine)
        for role, v in channels.items()
    }
    images = np.stack([slices.get(role, slices["flair"]) for role in SEQUENCES], axis=-1)
    return Volume(
        source=flair_path,
        images=np.ascontiguousarray(images),
        affine=np.asarray(affine, np.float64),
        header=header,
        shape=flair.shape,
        voxel_ml=_voxel_ml(affine, header),
        frame=frame,
        notes=tuple(notes),
    )


def slices_to_volume(stack: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """A stack of Kaggle-layout slices as a volume with its affine (the inverse of reading).

    Args:
        stack: [Z, H, W] slices in slice order (rows anterior first, columns patient
            right first, slice 1 the lowest).
        spacing: (column, row, slice) spacing in mm.

    Returns:
        (data [W, H, Z], the same values; affine [4, 4] voxel to RAS mm, axes L, P, S as
        DICOM's standard axial series), ready for `nibabel.Nifti1Image(data, affine)`.
    """
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    return np.asarray(stack).transpose(2, 1, 0), affine
