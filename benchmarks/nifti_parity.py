"""Per-volume Dice of predictions from NIfTI copies of kaggle_3m patients vs from their .tif slices.

  python benchmarks/nifti_parity.py --data_dir ../shared/data/lgg/kaggle_3m \
      --checkpoint pretrained/resunet_lgg --num_patients 20

Writes each patient's three sequences as NIfTI volumes (`volumes.slices_to_volume`, the
documented orientation) in a temporary folder: as 8-bit (uint8, the .tif values) and as
a linearly rescaled copy (int16, x13 + 200, which takes the min..max mapping). Runs
`--mode=predict` (predict.predict) on the .tif folders and on both NIfTI copies, reads
the written masks back, and scores each against the ground-truth masks with the
per-volume Dice of evaluation (2|P∩G| / (|P| + |G|) over all the patient's slices at
their original size). Prints one JSON line per patient and one with the summary.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COPIES = {"nifti_uint8": (1.0, 0.0, "uint8"), "nifti_int16_x13_plus_200": (13.0, 200.0, "int16")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True, help="kaggle_3m folder")
    p.add_argument("--checkpoint", default="pretrained/resunet_lgg")
    p.add_argument(
        "--num_patients", type=int, default=0, help="evenly spaced subset; 0 = all patients"
    )
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import nibabel as nib
    import numpy as np
    import tifffile

    from configs import resunet
    from resunet_jax import predict
    from resunet_jax.data import lgg, volumes

    slices = lgg.discover(args.data_dir)
    ids = lgg.patient_ids(slices)
    if args.num_patients:
        ids = [ids[i] for i in np.linspace(0, len(ids) - 1, args.num_patients).round().astype(int)]
    with tempfile.TemporaryDirectory() as tmp:
        truth = {}
        for pid in ids:
            patient = [s for s in slices if s.patient_id == pid]  # in slice order
            images, masks = zip(*(lgg.read_slice(s) for s in patient), strict=True)
            stack, truth[pid] = np.stack(images), np.stack(masks) > 0
            os.makedirs(os.path.join(tmp, "tif"), exist_ok=True)
            os.symlink(os.path.dirname(patient[0].image_path), os.path.join(tmp, "tif", pid))
            for copy, (scale, offset, dtype) in COPIES.items():
                os.makedirs(os.path.join(tmp, copy, pid))
                for channel, role in enumerate(volumes.SEQUENCES):
                    data, affine = volumes.slices_to_volume(stack[..., channel])
                    data = (data * scale + offset).astype(dtype)
                    path = os.path.join(tmp, copy, pid, f"{pid}_{role}.nii.gz")
                    nib.save(nib.Nifti1Image(data, affine), path)

        predicted = {}
        for kind in ("tif", *COPIES):
            config = resunet.get_config()
            config.checkpoint = args.checkpoint
            config.predict.input = os.path.join(tmp, kind)
            predict.predict(config, os.path.join(tmp, "work", kind))
            out = os.path.join(tmp, "work", kind, "predict")
            for pid in ids:
                if kind == "tif":
                    masks = [
                        tifffile.imread(
                            os.path.join(out, pid, os.path.basename(s.image_path)[:-4])
                            + "_pred_mask.tif"
                        )
                        for s in slices
                        if s.patient_id == pid
                    ]
                    predicted[kind, pid] = np.stack(masks) > 0
                else:
                    mask = nib.load(os.path.join(out, f"{pid}_pred_mask.nii.gz"))
                    predicted[kind, pid] = np.asanyarray(mask.dataobj).transpose(2, 1, 0) > 0

    def dice(pred, true):
        return float(2 * (pred & true).sum() / (pred.sum() + true.sum()))

    scores = {
        kind: np.array([dice(predicted[kind, pid], truth[pid]) for pid in ids])
        for kind in ("tif", *COPIES)
    }
    for i, pid in enumerate(ids):
        row = {"patient": pid, "num_slices": len(truth[pid])}
        row.update({f"dice_{kind}": round(float(v[i]), 4) for kind, v in scores.items()})
        print(json.dumps(row))
    summary = {"num_patients": len(ids), "checkpoint": args.checkpoint}
    for kind, values in scores.items():
        summary[f"dice_per_volume_mean_{kind}"] = round(float(values.mean()), 4)
        summary[f"dice_per_volume_median_{kind}"] = round(float(np.median(values)), 4)
        if kind != "tif":
            diff = np.abs(values - scores["tif"])
            summary[f"max_abs_dice_difference_{kind}"] = round(float(diff.max()), 4)
            summary[f"identical_masks_{kind}"] = sum(
                bool((predicted[kind, pid] == predicted["tif", pid]).all()) for pid in ids
            )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
