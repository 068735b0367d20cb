"""Runs a trained model on a user's own scans: .tif slices, NIfTI volumes and DICOM
series in; masks, overlays, probability maps and reports out (`inference.Predictor`).

Input: a .tif, a NIfTI file, or a folder of them, of patient folders or of DICOM series
folders (`*_mask.tif` files are ground truth and skipped; volumes: `data/volumes.py`
gives the naming of several sequences, the orientation and the intensity mapping). Each
.tif slice is brought to the model's input the way training saw it: 1-channel images
are replicated to 3 channels, 16-bit and float images rescaled to 0..255, any size
resized to `data.image_size`. One folder of .tif slices, or one volume, is one patient:
predicted together, so that "volume" normalisation takes its statistics from all its
readable slices, a 2.5-D model (`data.context_slices`) its neighbouring slices from them
in natural order (`x_2.tif` before `x_10.tif`), and `eval.postprocess=largest_component`
keeps its largest 3D connected component, as evaluation does. Predictions are resized
back to each slice's own size.

Output in `WORKDIR/predict/`, mirroring the input's paths:
- per .tif slice `<name>_pred_mask.tif` (uint8 0/255, like the dataset's masks), an
  overlay PNG per tumour slice and, with `predict.save_probabilities`,
  `<name>_pred_prob.tif` (float32 pixel probabilities);
- per volume `<name>_pred_mask.nii.gz` (uint8 0/1) and, with `predict.save_probabilities`,
  `<name>_pred_prob.nii.gz` (float32), on the input's grid with its affine and header;
- with `predict.save_uncertainty`, `<name>_pred_std.tif` per .tif slice and
  `<name>_pred_std.nii.gz` per volume (float32): the pixel uncertainty, the s.d. of the
  pixel probability across an ensemble's members and flips (`inference.Prediction`;
  0 for one model without `eval.flip_tta`);
- `predictions.csv`: one row per .tif slice and per volume (a volume's tumour
  probability is its highest slice's, its area its voxel count);
- `patients.csv` and `patients.json`: one row per patient (`PATIENT_FIELDS`): tumour
  yes/no, slices with tumour, lesion volume (in mL where the voxel size is known, i.e.
  for volumes, else in pixels, as `lesion_volume_unit` says), the largest 3D connected
  component's share of it, the mean pixel probability over the predicted lesion, and
  `notes`: what a volume is where it differs from the training data (skull-stripped,
  not named a FLAIR, thick, non-axial or oblique slices, a sequence resampled onto the
  FLAIR's grid or dropped, reframed; `volumes.read_volume`), "; "-separated; and the
  `backend` and `precision` that predicted it (`backends.Model`).
The `uncertainty` of a row (slice, volume or patient) is the mean pixel uncertainty over
its predicted mask (`lesion_uncertainty`), empty where the mask is. Probability and
uncertainty maps are the model's, before the slice detection gate that empties the
masks of slices called tumour-free. An input that cannot be used gets one error line
naming it and a row with its error in predictions.csv (and patients.csv for a volume);
the other inputs are still processed.
"""

import csv
import dataclasses
import json
import os
import re

import jax
import numpy as np
import tifffile
from absl import logging
from jax.experimental import multihost_utils

from resunet_jax import errors, inference, postprocess, progress, report, visualize
from resunet_jax.data import lgg, volumes
from resunet_jax.workdir import atomic_write, check_writable, keep_earlier

CSV_NAME = "predictions.csv"
CSV_FIELDS = (
    "file",
    "tumor_probability",
    "tumor",
    "predicted_area_pixels",
    "uncertainty",
    "review",
    "review_reason",
    "mask_file",
    "error",
)
PATIENTS_NAME = "patients.csv"  # and patients.json, the same rows
PATIENT_FIELDS = (
    "patient",
    "source",
    "num_slices",
    "tumor",
    "slices_with_tumor",
    "lesion_volume",
    "lesion_volume_unit",
    "largest_component_share",
    "mean_tumor_probability",
    "uncertainty",
    "review",
    "review_reason",
    "mask_file",
    "probability_file",
    "uncertainty_file",
    "preview_file",
    "notes",
    "error",
    "backend",
    "precision",
)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What `find_inputs` found.

    Attributes:
        slices: .tif slices, in natural order.
        volumes: NIfTI volumes and DICOM series, grouped into patients.
    """

    slices: list
    volumes: list


def find_inputs(path: str) -> Inputs:
    """The .tif slices, NIfTI volumes and DICOM series at `path` (a file, a folder, or a
    folder of folders).

    Raises:
        errors.DataError: `path` does not exist or holds none of them.
    """
    if os.path.isfile(path):
        if volumes.is_ground_truth(path):
            raise errors.DataError(
                f"{path}: a ground-truth mask, not a scan; give the scan or its folder "
                "(masks there are skipped)"
            )
        if volumes.is_nifti(path):
            return Inputs([], volumes.group_sources([path], path))
        return Inputs([path], [])
    if not os.path.isdir(path):
        raise errors.DataError(f"{path}: no such file or folder")
    found, sources, visited = [], [], set()
    # Folders of links to patient folders are common on shared storage, so links are
    # followed; each real folder is read once, which also ends any link cycle.
    for folder, subfolders, names in os.walk(path, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        found += [
            os.path.join(folder, n)
            for n in names
            if n.lower().endswith((".tif", ".tiff")) and "_mask." not in n.lower()
        ]
        sources += [os.path.join(folder, n) for n in names if volumes.is_nifti(n)]
        others = [n for n in names if not n.lower().endswith((".tif", ".tiff", ".nii", ".nii.gz"))]
        if any(volumes.is_dicom(os.path.join(folder, n)) for n in others):
            sources.append(folder)  # a DICOM series folder
    if not found and not sources:
        raise errors.DataError(f"{path}: no .tif slices, NIfTI volumes or DICOM series found")
    return Inputs(sorted(found, key=_natural_key), volumes.group_sources(sources, path))


def _natural_key(path: str):
    """Sorts `x_2.tif` before `x_10.tif` (slice numbers are not zero-padded)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def load_slice(path: str) -> np.ndarray:
    """Reads a user's slice as [H, W, 3] uint8.

    Accepts [H, W] (grey, replicated), [H, W, 1|3|4] (alpha dropped) and [3, H, W];
    uint16/int/float images are rescaled by their own range to 0..255.

    Raises:
        errors.DataError: unreadable, not an image, an unsupported shape or pixel type,
            or non-finite pixels.
    """
    image = lgg.read_tif(path)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 8:
        raise errors.DataError(
            f"{path}: not a 2-D slice (shape {image.shape}; expected [H, W], "
            "[H, W, 1|3|4] or [3, H, W], at least 8x8; save a stack one slice per file)"
        )
    image = volumes.to_uint8(image[..., :3] if image.shape[-1] == 4 else image, path)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def lesion_uncertainty(uncertainty, mask) -> float | None:
    """The mean pixel uncertainty over a predicted mask; None where it is empty.

    Args:
        uncertainty: [..., H, W] float32 pixel uncertainty (`inference.Prediction`).
        mask: the predicted mask, bool, of the same shape.
    """
    return round(float(uncertainty[mask].mean()), 6) if mask.any() else None


def _review(row: dict, threshold: float | None) -> dict:
    """`row` with its review flag and reason (`postprocess.review` of its uncertainty)."""
    flag, reason = postprocess.review(row["uncertainty"], threshold)
    return row | {"review": flag, "review_reason": reason}


def _write_prediction(path, image, result, i, base, out_dir, save) -> dict:
    """Writes one slice's mask (overlay if tumour, the maps `save` names); returns its
    CSV row.

    Args:
        path: the input file.
        image: [H, W, 3] uint8 slice as read.
        result: the `inference.Prediction` of its folder.
        i: the slice's index in `result`.
        base: input root; outputs mirror the path below it.
        out_dir: output folder.
        save: which float32 maps to write besides the mask: "prob", "std" (suffixes).
    """
    h, w = image.shape[:2]
    mask = result.masks[i, :h, :w]
    rel = os.path.splitext(os.path.relpath(path, base))[0]
    mask_path = os.path.join(out_dir, f"{rel}_pred_mask.tif")
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    tifffile.imwrite(mask_path, (mask * 255).astype(np.uint8), compression="zlib")
    maps = {"prob": result.probabilities, "std": result.uncertainty}
    for suffix in save:
        map_path = os.path.join(out_dir, f"{rel}_pred_{suffix}.tif")
        tifffile.imwrite(map_path, maps[suffix][i, :h, :w].astype(np.float32), compression="zlib")
    if mask.any():
        visualize.overlay_png(image, mask, os.path.join(out_dir, f"{rel}_overlay.png"))
    return {
        "file": path,
        "tumor_probability": round(float(result.tumor_probabilities[i]), 6),
        "tumor": bool(mask.any()),
        "predicted_area_pixels": int(mask.sum()),
        "uncertainty": lesion_uncertainty(result.uncertainty[i, :h, :w], mask),
        "mask_file": mask_path,
        "error": "",
    }


def _patient_row(name, source, result, voxel_ml=None, review=None, **files) -> dict:
    """One patient's patients.csv row.

    Args:
        name: the patient's output name.
        source: its input folder, file or DICOM series.
        result: its `inference.Prediction`, slices in slice order.
        voxel_ml: one voxel's volume in mL; None: the lesion is counted in pixels.
        review: the model's review threshold (None: no rule, the flag is left empty).
        **files: "mask_file", "probability_file", "uncertainty_file" written for it.
    """
    masks, probabilities = result.masks, result.probabilities
    voxels = int(masks.sum())
    largest = int(postprocess.largest_component_3d(masks).sum()) if voxels else 0
    row = dict.fromkeys(PATIENT_FIELDS, "") | {
        "patient": name,
        "source": source,
        "num_slices": len(masks),
        "tumor": voxels > 0,
        "slices_with_tumor": int(masks.any(axis=(1, 2)).sum()),
        "lesion_volume": round(voxels * voxel_ml, 4) if voxel_ml is not None else voxels,
        "lesion_volume_unit": "mL" if voxel_ml is not None else "pixels",
        "largest_component_share": round(largest / voxels, 4) if voxels else None,
        "mean_tumor_probability": (
            round(float(probabilities[masks].mean()), 4) if voxels else None
        ),
        "uncertainty": lesion_uncertainty(result.uncertainty, masks),
        **files,
    }
    return _review(row, review)


def _with_preview(row: dict, flair, masks, out_dir: str) -> dict:
    """`row` with its preview PNG written (`visualize.volume_preview`): the patient's
    slices with tumour, the prediction outlined on the FLAIR [Z, H, W]."""
    name = re.sub(r"\.tiff?$", "", row["patient"], flags=re.IGNORECASE)  # one slice's patient
    path = os.path.join(out_dir, f"{name}_preview.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    title = (
        f"{row['patient']}: lesion {row['lesion_volume']} {row['lesion_volume_unit']}, "
        f"{row['slices_with_tumor']} of {row['num_slices']} slices with tumour"
    )
    if row.get("review") is True:
        title += ", REVIEW"
    if row.get("notes"):
        title += f"\n{row['notes']}"
    visualize.volume_preview(flair, masks, path, title)
    return row | {"preview_file": path}


def _predict_folder(predictor, folder, paths, root, out_dir, save, rows, patients):
    """Predicts one folder's .tif slices (one patient's volume, in natural order);
    unusable files become error rows."""
    read = []
    for path in paths:
        try:
            read.append((path, load_slice(path)))
        except errors.DataError as e:
            logging.error("%s", e)
            rows.append(dict.fromkeys(CSV_FIELDS, "") | {"file": path, "error": str(e)})
    if not read:
        return
    result = predictor.predict([image for _, image in read])
    base = root if os.path.isdir(root) else os.path.dirname(root)  # outputs mirror below it
    for i, (path, image) in enumerate(read):
        row = _write_prediction(path, image, result, i, base, out_dir, save)
        rows.append(_review(row, predictor.review_threshold))
    name = volumes.output_name(folder, root)
    flair = np.zeros(result.masks.shape, np.uint8)  # slices of any size, padded as the masks
    for i, (_, image) in enumerate(read):
        flair[i, : image.shape[0], : image.shape[1]] = image[..., 1]
    row = _patient_row(name, folder, result, review=predictor.review_threshold)
    patients.append(_with_preview(row, flair, result.masks, out_dir))


def _on_input_slices(volume, result, predictor) -> inference.Prediction:
    """A prediction on the model grid brought back onto the FLAIR's own slices: the maps
    resampled, the masks decided there as on any slices (0.5, the same slice gate)."""
    if volume.frame.identity:
        return result
    probabilities = volume.to_input_slices(result.probabilities)
    uncertainty = volume.to_input_slices(result.uncertainty)
    masks = postprocess.decide(
        probabilities, result.tumor_probabilities, predictor.threshold, predictor.pixel_threshold
    )
    if predictor.postprocess == "largest_component":
        masks = postprocess.largest_component_3d(masks)
    return inference.Prediction(probabilities, masks, result.tumor_probabilities, uncertainty)


def _predict_volume(predictor, source, out_dir, save, rows, patients, reframe=True):
    """Predicts one NIfTI or DICOM patient into NIfTI files; an unusable one becomes
    error rows."""
    flair = source.sequences.get("flair", "")
    try:
        volume = volumes.read_volume(source, reframe)
    except errors.DataError as e:
        logging.error("%s", e)
        rows.append(dict.fromkeys(CSV_FIELDS, "") | {"file": flair, "error": str(e)})
        patients.append(
            dict.fromkeys(PATIENT_FIELDS, "")
            | {"patient": source.name, "source": flair, "error": str(e)}
        )
        return
    result = _on_input_slices(volume, predictor.predict(volume.images), predictor)
    files = {"mask_file": os.path.join(out_dir, f"{source.name}_pred_mask.nii.gz")}
    volume.write_nifti(volume.to_input_grid(result.masks).astype(np.uint8), files["mask_file"])
    maps = {
        "prob": ("probability_file", result.probabilities),
        "std": ("uncertainty_file", result.uncertainty),
    }
    for suffix in save:
        field, values = maps[suffix]
        files[field] = os.path.join(out_dir, f"{source.name}_pred_{suffix}.nii.gz")
        volume.write_nifti(volume.to_input_grid(values).astype(np.float32), files[field])
    row = {
        "file": volume.source,
        "tumor_probability": round(float(result.tumor_probabilities.max()), 6),
        "tumor": bool(result.masks.any()),
        "predicted_area_pixels": int(result.masks.sum()),
        "uncertainty": lesion_uncertainty(result.uncertainty, result.masks),
        "mask_file": files["mask_file"],
        "error": "",
    }
    rows.append(_review(row, predictor.review_threshold))
    review = predictor.review_threshold
    row = _patient_row(source.name, volume.source, result, volume.voxel_ml, review, **files)
    flair = volume.images[..., 1]
    if not volume.frame.identity:
        flair = volume.to_input_slices(flair.astype(np.float32))
    row = row | {"notes": "; ".join(volume.notes)}
    patients.append(_with_preview(row, flair, result.masks, out_dir))


def _write_csv(path, fields, rows):
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def predict(config, workdir: str, out_dir: str = "") -> list[dict]:
    """Predicts every input under `config.predict.input` into `workdir/predict/`.

    Args:
        config: run config.
        workdir: run directory (the checkpoint if `config.checkpoint` is not set).
        out_dir: the output folder instead of `workdir/predict/` (the console command's
            `-o`); an earlier prediction there is moved aside as in the workdir.

    Returns:
        The predictions.csv rows.
    """
    out_dir = out_dir or os.path.join(workdir, "predict")
    if jax.process_index() == 0:  # before any prediction, not after them
        check_writable(os.path.dirname(os.path.abspath(out_dir)))
    predictor = inference.Predictor.from_checkpoint(config.checkpoint or workdir, config)
    root = config.predict.input
    inputs = find_inputs(root)
    if jax.process_index() == 0:
        keep_earlier(out_dir, CSV_NAME)
    if jax.process_count() > 1:  # every process writes the same files: none before the move
        multihost_utils.sync_global_devices("resunet_jax earlier predictions kept")
    os.makedirs(out_dir, exist_ok=True)
    # The float32 maps written besides the masks, by their file suffix.
    save = [
        suffix
        for suffix, field in (("prob", "save_probabilities"), ("std", "save_uncertainty"))
        if config.predict.get(field, False)
    ]
    rows, patients = [], []
    # A folder's slices are one patient's volume ("volume" statistics, neighbouring
    # slices, 3D components and the patient's report): they are predicted together.
    folders = {}
    for path in inputs.slices:
        folders.setdefault(os.path.dirname(path), []).append(path)
    patients_in = [*folders.items(), *inputs.volumes]
    for item in progress.track(patients_in, "predict", unit="patients"):
        if isinstance(item, tuple):  # a folder of .tif slices
            _predict_folder(predictor, *item, root, out_dir, save, rows, patients)
        else:
            reframe = config.predict.get("reframe", True)
            _predict_volume(predictor, item, out_dir, save, rows, patients, reframe)
    for row in patients:  # what predicted them: figures from bf16 or int8 are told apart
        row.update(backend=predictor.model.backend, precision=predictor.model.precision)
    _write_csv(os.path.join(out_dir, CSV_NAME), CSV_FIELDS, rows)
    _write_csv(os.path.join(out_dir, PATIENTS_NAME), PATIENT_FIELDS, patients)
    json_path = os.path.join(out_dir, PATIENTS_NAME.replace(".csv", ".json"))
    with atomic_write(json_path) as f:
        json.dump(patients, f, indent=2)
    model = config.checkpoint or workdir
    report.write_index(out_dir, patients, "predict", f"Predictions: {root}", f"model: {model}")
    failed = sum(1 for r in rows if r["error"])
    logging.info(
        "Predicted %d inputs (%d with tumour, %d failed) of %d patients into %s",
        len(rows) - failed,
        sum(1 for r in rows if r["tumor"] is True),
        failed,
        len(patients),
        out_dir,
    )
    if failed == len(rows):
        raise errors.DataError(f"{root}: none of the {len(rows)} inputs could be used")
    return rows
