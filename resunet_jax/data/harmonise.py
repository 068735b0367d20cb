"""Brings a patient's volumes to the frame the model was trained on, and results back.

The LGG training slices (the Kaggle export) are whole-head axial slices on a 256 x 256
frame of square pixels, the head filling most of it, each sequence 8-bit per volume.
Users' volumes come on any grid: 1 mm isotropic 240 x 240 (BraTS), 0.45 mm 512 x 512,
208 x 256 oblique series, skull-stripped, with the other sequences of the session on
grids of their own. `harmonise` resamples every sequence onto one grid (the `Frame`)
that is parallel to the FLAIR's axial slices, one slice per FLAIR slice (so a slice's
detection maps back to it directly), with in-plane square pixels on a 256 x 256 frame:

- pixel size and position: the head's anterior-posterior extent and its centre, measured
  on the FLAIR (`measure_head`), are brought into the range the training slices span
  (`HEAD_EXTENT_RANGE`, `HEAD_ROW`, `HEAD_COLUMN`: their whole range over the 82 shared
  patients, in pixels of the 256 frame); a volume already inside it keeps its pixel size
  and position (a Kaggle-form volume is not resampled at all), one outside is scaled into
  the middle 80% of the training heads (`HEAD_EXTENT`). One pixel size
  for both axes, so the aspect ratio is kept (the training heads are 0.74..0.91 as wide
  as long, with square pixels). A skull-stripped brain is framed as the head it came
  from (`BRAIN_TO_HEAD`).
- the other sequences: resampled by their affines (same session, same frame of
  reference: no registration) with `nibabel.processing.resample_from_to`, linear; one
  that covers too little of the FLAIR's head (`MIN_COVERAGE`) is dropped with a note and
  the patient is predicted without it.
- intensities: each resampled sequence mapped from its minimum..maximum to 0..255, as
  the export's 8-bit volumes are (`volumes.to_uint8`); linear interpolation makes no new
  extremes, and outside the input's field of view the volume's minimum is filled in.

`to_input_slices` resamples the model's probability and uncertainty maps back onto the
FLAIR's own slices (linear), where the masks are decided as on any other slices
(`postprocess.decide`: 0.5 and the slice gate of the same slice).
"""

import dataclasses

import nibabel as nib
import numpy as np
from nibabel import processing
from scipy import ndimage

FRAME = 256  # the training slices' in-plane size (pixels)
# The training heads' anterior-posterior extent in pixels of the 256 frame (`measure_head`,
# bounding box over all slices, 82 shared patients): a head inside their whole range keeps
# its scale; one outside it is brought into their 10th..90th percentile, not to the edge.
HEAD_EXTENT_RANGE = (202.0, 256.0)
HEAD_EXTENT = (215.0, 252.0)
# The centre of the heads' bounding box (row, column; rows anterior first, columns patient
# right first); it moves only from outside all the training heads' (their whole range): a
# few pixels off-centre is common in the training data and costs nothing.
HEAD_ROW = (114.5, 147.0)
HEAD_COLUMN = (120.5, 143.0)
# A brain's anterior-posterior extent is about this share of its head's (scalp, skull
# and the CSF around the brain make the rest, ~12 mm front and back in adults).
BRAIN_TO_HEAD = 0.88
# The share of voxels outside the head at the volume's minimum from which it is taken
# for skull-stripped (`is_skull_stripped`).
STRIPPED_BACKGROUND = 0.95
# A sequence must cover this share of the FLAIR's head on the model grid to be used.
MIN_COVERAGE = 0.9


@dataclasses.dataclass(frozen=True)
class Frame:
    """The model grid of one patient, and the FLAIR's canonical grid it maps back to.

    Attributes:
        affine: [4, 4] voxel-to-RAS-mm affine of the model grid (FRAME x FRAME x Z,
            canonical axis order: columns increase to the patient's left as RAS axes do).
        shape: (FRAME, FRAME, Z).
        input_affine: [4, 4] affine of the FLAIR in its closest canonical (RAS) axes.
        input_shape: the FLAIR's shape in those axes (X, Y, Z).
        pixel_mm: the model grid's pixel size (mm); the FLAIR's own if not reframed.
        identity: the model grid is the FLAIR's canonical grid (nothing is resampled).
    """

    affine: np.ndarray
    shape: tuple
    input_affine: np.ndarray
    input_shape: tuple
    pixel_mm: float
    identity: bool


def canonical(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The image in its closest RAS+ axes: axis permutations and flips, no resampling."""
    return nib.as_closest_canonical(image)


def measure_head(data: np.ndarray) -> np.ndarray:
    """The head (or brain) of a canonical FLAIR volume: [X, Y, Z] bool.

    The foreground is what lies above a tenth of the way from the volume's minimum to its
    99th percentile (so z-scored and offset intensities measure as raw ones do), opened
    to cut thin noise bridges, its largest 3D component with the holes filled slice by
    slice.
    """
    data = np.asarray(data, np.float32)
    lo = float(data.min())
    foreground = data > lo + 0.1 * (float(np.percentile(data, 99)) - lo)
    foreground = ndimage.binary_opening(foreground, np.ones((3, 3, 1), bool))
    labels, n = ndimage.label(foreground)
    if n == 0:
        return foreground
    largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return np.stack([ndimage.binary_fill_holes(largest[..., k]) for k in range(data.shape[2])], -1)


def background_to_minimum(data: np.ndarray) -> np.ndarray:
    """A volume whose background is one value above its minimum, with that background set
    to the minimum of the rest: [X, Y, Z] float64 (otherwise `data` unchanged).

    Skull-stripped volumes z-scored over the brain keep the background at 0, in the middle
    of the brain's values, where a min..max mapping would make it mid-grey; the training
    slices' background is their darkest value. The background is the value of at least
    `STRIPPED_BACKGROUND` of the voxels on the volume's in-plane border.
    """
    border = np.concatenate([data[[0, -1]].ravel(), data[:, [0, -1]].ravel()])
    values, counts = np.unique(border, return_counts=True)
    background = values[np.argmax(counts)]
    if counts.max() < STRIPPED_BACKGROUND * border.size or background <= data.min():
        return data
    out = np.asarray(data, np.float64).copy()
    outside = out == background
    out[outside] = out[~outside].min()
    return out


def is_skull_stripped(data: np.ndarray, head: np.ndarray) -> bool:
    """Whether a canonical FLAIR looks skull-stripped: everything outside the head (the
    brain, here) is one exact value.

    Whole-head scans keep noise around the head: on the 82 shared patients at most 58% of
    the voxels outside it are at the minimum; a stripped volume has 99% or more
    (`STRIPPED_BACKGROUND`).

    Args:
        data: [X, Y, Z] canonical FLAIR.
        head: its `measure_head` mask.
    """
    data = np.asarray(data, np.float32)
    outside = data[~ndimage.binary_dilation(head, np.ones((5, 5, 1), bool))]
    if not head.any() or outside.size == 0:
        return False
    return float(np.mean(outside == data.min())) >= STRIPPED_BACKGROUND


def frame_for(
    image: nib.Nifti1Image, head: np.ndarray, skull_stripped: bool, reframe: bool = True
) -> Frame:
    """The model grid for a canonical FLAIR (see the module docstring).

    Args:
        image: the FLAIR in canonical axes (`canonical`).
        head: its head mask (`measure_head`), [X, Y, Z] bool.
        skull_stripped: frame the brain as the head it came from.
        reframe: False: the FLAIR's own grid (the other sequences are still resampled
            onto it).
    """
    affine = np.asarray(image.affine, np.float64)
    shape = image.shape[:3]
    if not reframe:
        dy = float(np.linalg.norm(affine[:3, 1]))
        return Frame(affine, tuple(shape), affine, tuple(shape), dy, True)
    dx, dy = (float(np.linalg.norm(affine[:3, a])) for a in (0, 1))
    if head.any():
        i, j = (np.flatnonzero(head.any(axis=tuple(b for b in range(3) if b != a))) for a in (0, 1))
        extent_mm = (j[-1] - j[0] + 1) * dy / (BRAIN_TO_HEAD if skull_stripped else 1.0)
        # The head's centre in the Kaggle layout: rows from anterior, columns from right.
        row = (shape[1] - 1) - (j[0] + j[-1]) / 2
        column = (shape[0] - 1) - (i[0] + i[-1]) / 2
    else:  # nothing to measure: the input's own scale and centre
        extent_mm, row, column = np.mean(HEAD_EXTENT) * dy, (shape[1] - 1) / 2, (shape[0] - 1) / 2
    # Pixels of the input's own scale unless that puts the head outside the training range.
    extent = extent_mm / dy
    if not HEAD_EXTENT_RANGE[0] <= extent <= HEAD_EXTENT_RANGE[1]:
        extent = np.clip(extent, *HEAD_EXTENT)
    pixel = extent_mm / extent
    s_row, s_column = pixel / dy, pixel / dx  # input pixels per model pixel
    last = FRAME - 1
    # Centre position on the model grid, as offset from the grid's centre, then clipped.
    row_t = np.clip(last / 2 + (row - (shape[1] - 1) / 2) / s_row, *HEAD_ROW)
    column_t = np.clip(last / 2 + (column - (shape[0] - 1) / 2) / s_column, *HEAD_COLUMN)
    # Model voxel (u, v, k) -> canonical voxel (i, j, k): rows and columns count from
    # the far end of j and i (Kaggle layout), so model row r = last - v, column = last - u.
    to_input = np.eye(4)
    to_input[0, 0], to_input[1, 1] = s_column, s_row
    to_input[0, 3] = (shape[0] - 1) - column - s_column * (last - column_t)
    to_input[1, 3] = (shape[1] - 1) - row - s_row * (last - row_t)
    identity = shape[:2] == (FRAME, FRAME) and np.allclose(to_input, np.eye(4), atol=1e-6)
    return Frame(
        affine=affine if identity else affine @ to_input,
        shape=(FRAME, FRAME, shape[2]),
        input_affine=affine,
        input_shape=tuple(shape),
        pixel_mm=float(dy if identity else pixel),
        identity=bool(identity),
    )


def resample(image: nib.Nifti1Image, frame: Frame) -> np.ndarray:
    """One sequence on the model grid, [FRAME, FRAME, Z] float32 (canonical axes);
    outside its field of view, its minimum."""
    data = np.asarray(image.dataobj, np.float32)
    if image.shape[:3] == frame.shape and np.allclose(image.affine, frame.affine, atol=1e-3):
        return data
    # "grid-constant": a slice on the grid's edge maps to it only within rounding, which
    # "constant" would fill with `cval`.
    source = nib.Nifti1Image(data, image.affine)
    out = processing.resample_from_to(
        source, (frame.shape, frame.affine), order=1, mode="grid-constant", cval=float(data.min())
    )
    return np.asarray(out.dataobj, np.float32)


def covered_share(image: nib.Nifti1Image, frame: Frame, head: np.ndarray) -> float:
    """The share of the head on the model grid ([FRAME, FRAME, Z] bool) that lies inside
    `image`'s field of view."""
    inside = nib.Nifti1Image(np.ones(image.shape[:3], np.float32), image.affine)
    out = processing.resample_from_to(
        inside, (frame.shape, frame.affine), order=0, mode="grid-constant", cval=0.0
    )
    covered = np.asarray(out.dataobj) > 0.5
    return float((covered & head).sum() / max(head.sum(), 1))


def to_input_slices(values: np.ndarray, frame: Frame) -> np.ndarray:
    """Per-slice maps on the model grid back onto the FLAIR's canonical slices.

    Args:
        values: [Z, FRAME, FRAME] float maps in the Kaggle layout (the model's slices).
        frame: the patient's `Frame`.

    Returns:
        [Z, Y, X] float32 in the Kaggle layout of the FLAIR's canonical grid (linear;
        0 where the model grid did not reach).
    """
    values = np.asarray(values, np.float32)
    if frame.identity:
        return values
    on_grid = nib.Nifti1Image(values[:, ::-1, ::-1].transpose(2, 1, 0).copy(), frame.affine)
    out = processing.resample_from_to(
        on_grid, (frame.input_shape, frame.input_affine), order=1, mode="grid-constant", cval=0.0
    )
    return np.asarray(out.dataobj, np.float32).transpose(2, 1, 0)[:, ::-1, ::-1]
