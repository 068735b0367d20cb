"""Per-volume Dice of `--mode=predict` on shared patients turned into the forms real scans take.

  PYTHONPATH=. python benchmarks/shifted_inputs.py --data_dir ../shared/data/lgg/kaggle_3m \
      --checkpoint pretrained/resunet_lgg

Each patient's three sequences (pre-contrast, FLAIR, post-contrast .tif slices, taken as
0.9 x 0.9 x 4 mm) are written as NIfTI volumes in each form of `FORMS`, the reference
mask carried onto the form's grid the same way (linear, > 0.5). `predict.predict` (what
`--mode=predict` runs) predicts every form and the .tif folders with the config
`resunet-predict` makes (`cli.predict_config`: by default flip TTA, the model's
calibrated rules and the fastest installed backend; `--predict_args=--no-flip-tta` is
`--mode=predict`'s default config); each written mask is
scored against the reference on its own grid with the per-volume Dice of evaluation
(2|P∩G| / (|P| + |G|) over the whole volume). Prints one JSON line per patient and
form, then a table: per form the mean (median) Dice, the mean difference to the .tif
path's, and the notes patients.csv gave. The patients are fold 0's held-out ones
(`--fold`, as `--mode=eval` scores the shipped model), which it never saw in training.
"""

import argparse
import collections
import csv
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPACING = (0.9, 0.9, 4.0)  # column, row, slice (mm) of the .tif slices
ROLES = ("pre", "flair", "post")  # channel order of the .tif slices
FORMS = (
    "kaggle_nifti",  # the export itself as uint8 NIfTI: must equal the .tif path
    "flair_only",  # the FLAIR alone (the no-contrast network)
    "skull_stripped",  # head eroded by 13 px (~12 mm, keeping the tumour), background 0
    "resampled_1mm_240",  # 1 mm isotropic on a 240 x 240 grid (BraTS' grid)
    "oblique_208x256",  # 208 of the 256 columns, the slices tilted 12 degrees (TCIA's series)
    "zscored",  # float32 (x - mean) / std per volume
    "int16_raw",  # int16 x13 + 200 (a scanner's raw range)
    "sequences_other_grid",  # pre and post on 240 x 240 x (Z + 4), shifted 7 mm, rotated 8°
    "thick_5mm",  # 5 mm slices: each averages 5 mm of tissue
    "brats_like",  # skull-stripped, 1 mm on 240 x 240, z-scored over the brain
)


def grid(image, shape, voxel_mm, degrees=0.0, shift_mm=(0.0, 0.0, 0.0)):
    """A `shape` grid of `voxel_mm` voxels with `image`'s axis directions, centred on its
    centre, rotated `degrees` about the left-right axis and shifted (world mm).

    Returns:
        [4, 4] voxel-to-world affine.
    """
    import numpy as np

    centre = image.affine @ np.append((np.array(image.shape[:3]) - 1) / 2, 1)
    a = np.radians(degrees)
    rotation = np.eye(3)
    rotation[1:, 1:] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    directions = np.sign(np.diag(image.affine)[:3])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(directions * np.asarray(voxel_mm, float))
    affine[:3, 3] = centre[:3] + shift_mm - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


def make_form(form, sequences, reference):
    """One patient in one form.

    Args:
        form: a name of `FORMS`.
        sequences: {role: nib.Nifti1Image uint8 on the .tif slices' grid}.
        reference: nib.Nifti1Image float32 0/1 on the same grid.

    Returns:
        ({role: nib.Nifti1Image}, reference nib.Nifti1Image bool-valued uint8 on the
        FLAIR's grid of the form).
    """
    import nibabel as nib
    import numpy as np
    from nibabel import processing
    from scipy import ndimage

    from resunet_jax.data import harmonise

    flair = sequences["flair"]
    z = flair.shape[2]

    def onto(image, shape, affine):
        out = processing.resample_from_to(image, (shape, affine), order=1, mode="constant")
        return np.asarray(out.dataobj, np.float32)

    def to(images_shape_affine):
        shape, affine, roles = images_shape_affine
        out = {r: nib.Nifti1Image(onto(sequences[r], shape, affine), affine) for r in roles}
        return out, nib.Nifti1Image((onto(reference, shape, affine) > 0.5).astype(np.uint8), affine)

    def brain():  # a skull-stripping tool's output: the head less ~12 mm, not the tumour
        head = harmonise.measure_head(np.asarray(flair.dataobj))
        eroded = ndimage.binary_erosion(head, np.ones((3, 3, 1), bool), iterations=13)
        tumour = ndimage.binary_dilation(np.asarray(reference.dataobj) > 0.5, iterations=2)
        return eroded | tumour

    def zscore(data, where):
        data = np.asarray(data, np.float32)
        values = data[where]
        out = (data - values.mean()) / max(values.std(), 1e-6)
        return np.where(where, out, 0.0).astype(np.float32)

    ref = nib.Nifti1Image((np.asarray(reference.dataobj) > 0.5).astype(np.uint8), flair.affine)
    if form == "kaggle_nifti":
        return dict(sequences), ref
    if form == "flair_only":
        return {"flair": flair}, ref
    if form == "skull_stripped":
        keep = brain()
        out = {
            r: nib.Nifti1Image(np.asarray(i.dataobj) * keep, i.affine) for r, i in sequences.items()
        }
        return out, ref
    if form == "resampled_1mm_240":
        shape = (240, 240, round(z * SPACING[2]))
        return to((shape, grid(flair, shape, (1, 1, 1)), ROLES))
    if form == "oblique_208x256":
        # An acquisition's slices are sharp in their own plane, so the same slices (not
        # resampled ones) with 24 of 256 columns cropped off each side, their affine tilted.
        c = round(flair.shape[0] * 24 / 256)
        tilted = grid(flair, (flair.shape[0] - 2 * c, flair.shape[1], z), SPACING, degrees=12)
        out = {
            r: nib.Nifti1Image(np.asarray(i.dataobj)[c:-c], tilted) for r, i in sequences.items()
        }
        return out, nib.Nifti1Image(np.asarray(ref.dataobj)[c:-c], tilted)
    if form == "zscored":
        everywhere = np.ones(flair.shape, bool)
        out = {
            r: nib.Nifti1Image(zscore(i.dataobj, everywhere), i.affine)
            for r, i in sequences.items()
        }
        return out, ref
    if form == "int16_raw":
        out = {
            r: nib.Nifti1Image(
                (np.asarray(i.dataobj, np.int16) * 13 + 200).astype(np.int16), i.affine
            )
            for r, i in sequences.items()
        }
        return out, ref
    if form == "sequences_other_grid":
        shape = (240, 240, z + 4)
        affine = grid(flair, shape, SPACING, degrees=8, shift_mm=(7.0, -5.0, 3.0))
        out, _ = to((shape, affine, ("pre", "post")))
        out["flair"] = flair
        return out, ref
    if form == "thick_5mm":
        # Each slice takes in half a millimetre of each neighbour's tissue (5 mm of the
        # 4 mm-apart slices), labelled 5 mm apart: partial volume without the blur that
        # resampling 4 mm slices would add.
        thick = np.diag([1.0, 1.0, 5.0 / SPACING[2], 1.0])
        weights = np.array([0.5, SPACING[2], 0.5]) / 5.0
        out = {
            r: nib.Nifti1Image(
                ndimage.correlate1d(np.asarray(i.dataobj, np.float32), weights, 2, mode="nearest"),
                i.affine @ thick,
            )
            for r, i in sequences.items()
        }
        return out, nib.Nifti1Image(np.asarray(ref.dataobj), ref.affine @ thick)
    if form == "brats_like":
        keep = brain()
        stripped = {
            r: nib.Nifti1Image(np.asarray(i.dataobj, np.float32) * keep, i.affine)
            for r, i in sequences.items()
        }
        shape = (240, 240, round(z * SPACING[2]))
        affine = grid(flair, shape, (1, 1, 1))
        inside = onto(nib.Nifti1Image(keep.astype(np.float32), flair.affine), shape, affine) > 0.5
        out = {
            r: nib.Nifti1Image(zscore(onto(i, shape, affine), inside), affine)
            for r, i in stripped.items()
        }
        return out, nib.Nifti1Image((onto(reference, shape, affine) > 0.5).astype(np.uint8), affine)
    raise ValueError(f"unknown form {form!r}; forms: {', '.join(FORMS)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True, help="kaggle_3m folder")
    p.add_argument("--checkpoint", default="pretrained/resunet_lgg")
    p.add_argument("--fold", type=int, default=0, help="held-out fold of the 5-fold split")
    p.add_argument("--num_patients", type=int, default=0, help="first N of the fold; 0 = all")
    p.add_argument("--forms", default=",".join(FORMS), help="comma-separated subset of FORMS")
    p.add_argument("--json", default="", help="also write the rows and summary here")
    p.add_argument(
        "--predict_args",
        default="",
        help="resunet-predict's options, as one string (default: its defaults, flip TTA "
        "and the fastest backend; '--no-flip-tta' is launch.py --mode=predict's default)",
    )
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import nibabel as nib
    import numpy as np
    import tifffile

    from resunet_jax import cli, predict
    from resunet_jax.data import lgg, volumes

    forms = [f for f in args.forms.split(",") if f]
    unknown = sorted(set(forms) - set(FORMS))
    if unknown:
        p.error(f"unknown forms {unknown}; forms: {', '.join(FORMS)}")
    slices = lgg.discover(args.data_dir)
    _, ids = lgg.split_patients(lgg.patient_ids(slices), 5, args.fold, 0)
    ids = ids[: args.num_patients or None]

    def dice(pred, true):
        return float(2 * (pred & true).sum() / max(pred.sum() + true.sum(), 1))

    rows, notes, engines = [], collections.defaultdict(collections.Counter), set()
    with tempfile.TemporaryDirectory() as tmp:
        truth, references = {}, collections.defaultdict(dict)
        os.makedirs(os.path.join(tmp, "tif"))
        for pid in ids:
            patient = [s for s in slices if s.patient_id == pid]  # in slice order
            images, masks = zip(*(lgg.read_slice(s) for s in patient), strict=True)
            stack, truth[pid] = np.stack(images), np.stack(masks) > 0
            os.symlink(
                os.path.abspath(os.path.dirname(patient[0].image_path)),
                os.path.join(tmp, "tif", pid),
            )
            sequences = {}
            for channel, role in enumerate(ROLES):
                data, affine = volumes.slices_to_volume(stack[..., channel], SPACING)
                sequences[role] = nib.Nifti1Image(data, affine)
            data, _ = volumes.slices_to_volume(truth[pid].astype(np.float32), SPACING)
            reference = nib.Nifti1Image(data, affine)
            for form in forms:
                out, references[form][pid] = make_form(form, sequences, reference)
                os.makedirs(os.path.join(tmp, form, pid))
                for role, image in out.items():
                    nib.save(image, os.path.join(tmp, form, pid, f"{pid}_{role}.nii.gz"))

        for kind in ("tif", *forms):
            options = ["-i", os.path.join(tmp, kind), "-o", os.path.join(tmp, "unused")]
            options += ["--model", args.checkpoint, *args.predict_args.split()]
            config = cli.predict_config(cli.parser().parse_args(options))
            workdir = os.path.join(tmp, "work", kind)
            predict.predict(config, workdir)
            out = os.path.join(workdir, "predict")
            with open(os.path.join(out, predict.PATIENTS_NAME)) as f:
                for row in csv.DictReader(f):
                    engines.add(f"{row['backend']} {row['precision']}")
                    if kind != "tif":
                        for note in filter(None, row["notes"].split("; ")):
                            # The note's kind, without its numbers (pixel size, share).
                            notes[kind][note.split(" (")[0].split(" at ")[0]] += 1
            for pid in ids:
                if kind == "tif":
                    pred = np.stack(
                        [
                            tifffile.imread(
                                os.path.join(out, pid, os.path.basename(s.image_path)[:-4])
                                + "_pred_mask.tif"
                            )
                            for s in slices
                            if s.patient_id == pid
                        ]
                    )
                    score = dice(pred > 0, truth[pid])
                else:
                    mask = nib.load(os.path.join(out, f"{pid}_pred_mask.nii.gz"))
                    ref = references[kind][pid]
                    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine), kind
                    score = dice(np.asarray(mask.dataobj) > 0, np.asarray(ref.dataobj) > 0)
                rows.append({"form": kind, "patient": pid, "dice": round(score, 4)})
                print(json.dumps(rows[-1]), flush=True)

    by_form = collections.defaultdict(dict)
    for row in rows:
        by_form[row["form"]][row["patient"]] = row["dice"]
    tif = np.array([by_form["tif"][pid] for pid in ids])
    summary = {
        "checkpoint": args.checkpoint,
        "fold": args.fold,
        "num_patients": len(ids),
        "predict_args": args.predict_args,
        "backends": sorted(engines),
    }
    print(f"\n{len(ids)} patients of fold {args.fold}, {args.checkpoint}")
    print(f"{'form':<22} {'Dice mean':>9} {'median':>7} {'vs .tif':>8}  notes (patients)")
    for kind in ("tif", *forms):
        values = np.array([by_form[kind][pid] for pid in ids])
        summary[kind] = {
            "dice_per_volume_mean": round(float(values.mean()), 4),
            "dice_per_volume_median": round(float(np.median(values)), 4),
            "difference_to_tif": round(float((values - tif).mean()), 4),
            "notes": dict(notes[kind]),
        }
        note = ", ".join(f"{n} ({c})" for n, c in sorted(notes[kind].items()))
        print(
            f"{kind:<22} {values.mean():9.3f} {np.median(values):7.3f} "
            f"{(values - tif).mean():+8.3f}  {note}"
        )
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
