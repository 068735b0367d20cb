"""Evaluation over a split: probabilities on the devices; masks at each slice's original
size, overlap counts and per-patient metrics on the host.

`evaluate_checkpoint` is what both `--mode=eval` and the end of training run, so the
two write identical reports: `eval/metrics.json`, `eval/per_patient.csv` and a figure.
`cross_validate` (`--mode=cv`) scores the runs of a k-fold cross-validation, each on
its own validation fold, into one report: `cv/metrics.json`, `cv/per_patient.csv`.

A patient's uncertainty (per_patient.csv) is the mean pixel s.d. across an ensemble's
members and flips (`backends.Model`) over the pixels it calls tumour
(probability >= 0.5 on slices past the detection threshold, before largest-component
post-processing); empty where it calls none, 0 for one model without flip TTA.
"""

import collections
import concurrent.futures
import csv
import json
import os

import jax
import numpy as np
from absl import logging

from resunet_jax import (
    backends,
    config_schema,
    errors,
    inputs,
    metrics,
    postprocess,
    progress,
    report,
    visualize,
)
from resunet_jax.data import arrays, sources
from resunet_jax.workdir import atomic_write, check_writable, keep_earlier

# Figures reported for each post-processing variant.
COMPARED_METRICS = (
    "dice_per_volume_mean",
    "dice_per_volume_median",
    "dice_tumor_slices_mean",
    "detection_accuracy",
    "detection_sensitivity",
    "detection_specificity",
)
# Figures a cross-validation reports per fold and as mean and s.d. over the folds.
CV_METRICS = (*COMPARED_METRICS, "iou_per_volume_mean", "detection_auc")
PATIENT_FIELDS = (  # per_patient.csv
    "patient_id",
    "num_slices",
    "dice",
    "iou",
    "true_area",
    "pred_area",
    "intersection",
    "uncertainty",
    "review",
    "review_reason",
    "preview_file",
)


class Evaluator:
    """Evaluates a model on every slice of a set of patients.

    The slices are read once, as arrays at the model's input side (`data.arrays`); each
    batch's model inputs are made from them by `inputs.model_input`, as prediction makes
    them.

    Args:
        source: the data source.
        config: run config (model, data.image_size, data.normalization,
            data.context_slices, data.prepared_dir, eval.batch_size, eval.flip_tta,
            eval.postprocess, eval.missing_sequences).
        patient_ids: patients to evaluate.

    The methods take a `backends.Model` (as `backends.restore` returns it; training's
    from `backends.from_variables`).
    """

    def __init__(self, source: sources.Source, config, patient_ids):
        if not patient_ids:
            raise errors.DataError("no slice to evaluate: the evaluation split is empty")
        devices = jax.local_device_count()
        self.batch_size = -(-config.eval.batch_size // devices) * devices
        self.postprocess = config.eval.postprocess
        self.normalization = config.data.normalization
        self.slices = arrays.load(
            source.data_dir,
            source.slices,
            patient_ids,
            config.data.image_size,
            sources.prepared_root(config),
        )
        pids, index = self.slices["patient_id"], self.slices["slice_index"]
        self.context = inputs.neighbours(pids, index, config.data.context_slices)
        self.stats = None
        if self.normalization == "volume":  # each slice's patient's statistics
            self.stats = inputs.volume_statistics(self.slices["image"], pids)
        # With eval.missing_sequences set, the named sequences are replaced by the FLAIR:
        # how the model fares on a patient without them.
        missing = np.array(inputs.MISSING_SEQUENCES[config.eval.missing_sequences])
        self.missing = missing if missing.any() else None

    def _batches(self):
        """Row indices [b] of the slices, b <= batch_size, in patient then slice order."""
        n = len(self.slices["image"])
        for start in range(0, n, self.batch_size):
            yield np.arange(start, min(start + self.batch_size, n))

    def inputs(self, rows) -> np.ndarray:
        """The model inputs [b, S, S, C] float32 of the slices at `rows` [b]."""
        image = inputs.stack_context(self.slices["image"], self.context[rows])
        stats = None if self.stats is None else self.stats[rows]
        return inputs.model_input(image, stats, self.missing, self.normalization)

    def predict(self, model: backends.Model, progress_name: str = "") -> dict:
        """Per-slice values of every slice, judged at the slice's original size.

        Args:
            model: the model.
            progress_name: if set, the loop's progress is shown under this name
                (`progress.track`; training's validations show none).

        Returns:
            {"patient_id", "slice_index", "tumor_prob", and "intersection", "pred_area",
            "true_area" of the mask thresholded at probability 0.5 (before the detection
            gate), "std_sum" the sum of the pixel s.d. over that mask} [N], and
            "pred_mask", "true_mask" [N, H, W] bool, H x W the largest slice (smaller ones
            padded with False); in patient then slice order.
        """
        true_masks = self.slices["original_mask"] > 0
        pred_masks = np.zeros(true_masks.shape, bool)  # filled batch by batch
        columns = collections.defaultdict(list)
        batches = list(self._batches())
        if progress_name:
            unit = f"batches of {self.batch_size} slices"
            batches = progress.track(batches, progress_name, unit=unit)
        for rows in batches:
            probs, tumor, std = model.probabilities(self.inputs(rows))
            sizes = self.slices["orig_height"][rows], self.slices["orig_width"][rows]
            small = postprocess.masks_at_original_size(probs, *sizes, model.pixel_threshold)
            small_std = postprocess.probabilities_at_original_size(std, *sizes)
            columns["std_sum"].append(np.sum(small_std * small, axis=(1, 2)))
            pred = pred_masks[rows[0] : rows[-1] + 1]  # a view: `_batches` rows are a range
            pred[:, : small.shape[1], : small.shape[2]] = small
            for k, v in metrics.slice_counts(pred, true_masks[rows]).items():
                columns[k].append(np.asarray(v))
            columns["tumor_prob"].append(tumor)
        out = {k: np.concatenate(v) for k, v in columns.items()}
        out.update(
            pred_mask=pred_masks,
            true_mask=true_masks,
            patient_id=self.slices["patient_id"],
            slice_index=self.slices["slice_index"],
        )
        return out

    def run(
        self,
        model: backends.Model,
        threshold: float | None = None,
        progress_name: str = "",
        preview_dir: str = "",
    ) -> tuple[dict, dict]:
        """Evaluates; `threshold` None selects the detection threshold on these patients.

        Metrics follow `eval.postprocess`; `metrics["postprocess_comparison"]` gives the
        main figures with and without the 3D largest-component post-processing.

        Args:
            model: the model.
            threshold: the detection threshold.
            progress_name: shows the progress under this name (`predict`).
            preview_dir: if set, writes each patient's preview there
                (`<patient>_preview.png`: the prediction and the reference outlined on
                the FLAIR, `visualize.volume_preview`) and names it in its row.

        Returns:
            (metrics, per-patient rows) as `metrics.summarize` defines them, with each
            patient's "uncertainty" (the module docstring) and its mean over the
            patients with a predicted lesion, "uncertainty_per_volume_mean".
        """
        cols = self.predict(model, progress_name)
        chosen = model.postprocess(self.postprocess)
        true_tumor = cols["true_area"] > 0
        if threshold is None:
            threshold = metrics.select_threshold(cols["tumor_prob"], true_tumor)
        gate = postprocess.tumour_slices(cols["tumor_prob"], threshold)
        gated = cols["pred_mask"]
        gated[~gate] = False  # in place: the masks of a whole split are hundreds of MB
        largest = postprocess.largest_component_per_patient(
            cols["patient_id"], cols["slice_index"], gated
        )
        variants = {
            "none": {k: cols[k] for k in ("intersection", "pred_area", "true_area", "std_sum")},
            "largest_component": metrics.slice_counts(largest, cols["true_mask"]),
        }
        results = {
            name: metrics.summarize(cols["patient_id"], counts, cols["tumor_prob"], threshold)
            for name, counts in variants.items()
        }
        summary, patients = results[chosen]
        for pid, row in results["none"][1].items():
            area = row["pred_area"]
            patients[pid]["uncertainty"] = row["std_sum"] / area if area else None
            flag, reason = postprocess.review(patients[pid]["uncertainty"], model.review_threshold)
            patients[pid].update(review=flag, review_reason=reason)
        flags = [r["review"] for r in patients.values() if r["review"] != ""]
        summary = dict(
            summary,
            pixel_threshold=model.pixel_threshold,
            calibrated=model.calibration is not None,
            review_rate=float(np.mean(flags)) if flags else None,
            postprocess=chosen,
            uncertainty_per_volume_mean=_mean(r["uncertainty"] for r in patients.values()),
        )
        summary["postprocess_comparison"] = {
            name: {k: r[0][k] for k in COMPARED_METRICS} for name, r in results.items()
        }
        if preview_dir:
            final = largest if chosen == "largest_component" else gated
            self._previews(preview_dir, patients, final, cols["true_mask"])
        return summary, patients

    def _previews(self, out_dir: str, patients: dict, masks, true_masks):
        """Writes each patient's preview (`run`) from its final masks [N, H, W]."""
        os.makedirs(out_dir, exist_ok=True)

        def write(pid):
            row, rows = patients[pid], self.slices["patient_id"] == pid
            path = os.path.join(out_dir, f"{pid}_preview.png")
            dice = "no tumour" if row["true_area"] == 0 else f"Dice {row['dice']:.3f}"
            title = f"{pid}: {dice}; reference red, prediction green"
            flair = self.slices["image"][rows, ..., 1]
            visualize.volume_preview(flair, masks[rows], path, title, true_masks[rows])
            return path

        # In threads: numpy and Pillow release the GIL, and the cores that ran the model
        # are idle by now.
        with concurrent.futures.ThreadPoolExecutor() as pool:
            for pid, path in zip(patients, pool.map(write, patients), strict=True):
                patients[pid]["preview_file"] = path

    def results_grid(self, model: backends.Model, threshold: float, num_rows: int = 6):
        """The results grid (visualize.results_grid) of the first `num_rows` slices:
        half with tumour (one per patient while possible), half without."""
        want_tumor, want_clean = num_rows - num_rows // 2, num_rows // 2
        shown, patients_shown = [], set()
        for rows in self._batches():
            probs, tumor, _ = model.probabilities(self.inputs(rows))
            for i, row in enumerate(rows):
                has_tumor = bool(self.slices["mask"][row].any())
                pid = self.slices["patient_id"][row]
                if has_tumor and want_tumor and pid not in patients_shown:
                    want_tumor -= 1
                elif not has_tumor and want_clean:
                    want_clean -= 1
                else:
                    continue
                patients_shown.add(pid)
                pred = postprocess.decide(
                    probs[i : i + 1], tumor[i : i + 1], threshold, model.pixel_threshold
                )[0]
                shown.append(
                    (
                        self.slices["image"][row],
                        self.slices["mask"][row, ..., 0],
                        pred,
                        f"{pid} #{self.slices['slice_index'][row]}",
                    )
                )
            if not want_tumor and not want_clean:
                break
        images, true_masks, pred_masks, titles = zip(*shown, strict=True)
        return visualize.results_grid(images, true_masks, pred_masks, titles)


def write_report(
    eval_dir: str,
    summary: dict,
    patients: dict,
    grid: np.ndarray | None = None,
    fields: tuple = PATIENT_FIELDS,
):
    """Writes metrics.json, per_patient.csv (`fields`), the per-patient Dice figure and,
    if given, the results grid.

    An earlier report in `eval_dir` (say, training's final evaluation before a
    re-evaluation with another checkpoint, split or setting) is first moved aside (see
    `workdir.keep_earlier`), never overwritten; files are written whole
    (`workdir.atomic_write`).
    """
    keep_earlier(eval_dir, "metrics.json")
    os.makedirs(eval_dir, exist_ok=True)
    with atomic_write(os.path.join(eval_dir, "metrics.json")) as f:
        json.dump(summary, f, indent=2)
    with atomic_write(os.path.join(eval_dir, "per_patient.csv"), newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        for pid, row in patients.items():
            writer.writerow(dict(row, patient_id=pid))
    visualize.per_patient_dice_figure(patients, os.path.join(eval_dir, "per_patient_dice.png"))
    if grid is not None:
        visualize.save_png(grid, os.path.join(eval_dir, "results_grid.png"))


def patients_to_evaluate(source: sources.Source, train_patients, split: str) -> tuple[list, list]:
    """The patients an evaluation scores, judged against the checkpoint's training set.

    A checkpoint lists the patients it was trained on (`meta["train_patients"]`), so
    `eval.split=val` scores exactly the patients of `data.dir` that it never saw. The
    k-fold split alone cannot promise that: on a folder with more or other patients
    (all 110 of the LGG collection, say) the same `data.fold` holds a different set,
    most of them training patients.

    Args:
        source: the opened data source.
        train_patients: the checkpoint's training patient ids.
        split: `eval.split`.

    Returns:
        (patient ids to score, the ones among them the checkpoint trained on).

    Raises:
        errors.DataError: `eval.split=val` and the checkpoint trained on every patient of
            `data.dir`, so no figure would measure anything but fitting.
    """
    trained = set(train_patients)
    if split == "all":
        ids = source.patient_ids
    else:
        ids = sorted(set(source.patient_ids) - trained)
        if not ids:
            raise errors.DataError(
                f"{source.data_dir}: the checkpoint was trained on every patient in this "
                "folder, so there is none left to validate on; --config.eval.split=all scores "
                "them anyway (a measure of fit, not of generalisation)"
            )
    seen = sorted(trained.intersection(ids))
    if seen:
        logging.warning(
            "%d of the %d patients evaluated were in the checkpoint's training set: "
            "these figures do not measure generalisation",
            len(seen),
            len(ids),
        )
    return ids, seen


def evaluate_checkpoint(config, workdir: str, source: sources.Source | None = None) -> dict:
    """Restores a checkpoint, evaluates it on `eval.split`, and writes `workdir/eval/`.

    The checkpoint is `config.checkpoint` if set, else the workdir's best (else latest);
    with inference.backend=onnx or openvino, the exported model there
    (`backends.find_onnx`).

    Args:
        config: run config.
        workdir: run directory.
        source: an already opened data source (training passes its own).

    Returns:
        The metrics written to metrics.json.
    """
    if jax.process_index() == 0:  # before the evaluation, not after it
        check_writable(workdir)
    path = config.checkpoint or workdir
    model = backends.restore(path, config.inference.backend, config)
    meta = model.meta
    config = config_schema.checkpoint_config(config, meta)
    # With the list of training patients the k-fold split is not needed, so a folder
    # of fewer patients than data.num_folds (a user's own two, say) can be scored.
    source = source or sources.open_source(config, workdir, split=False)
    patient_ids, seen = patients_to_evaluate(source, meta["train_patients"], config.eval.split)
    evaluator = Evaluator(source, config, patient_ids)
    # The detection threshold chosen on the validation patients during training (an
    # ensemble's: the mean of its members').
    threshold = model.threshold
    eval_dir = os.path.join(workdir, "eval")
    if jax.process_index() == 0:  # the previews are written into a new eval/
        keep_earlier(eval_dir, "metrics.json")
    previews = eval_dir if jax.process_index() == 0 else ""
    summary, patients = evaluator.run(model, threshold, "eval", previews)
    summary.update(
        checkpoint_step=int(meta["step"]),
        checkpoint=",".join(os.path.abspath(p) for p in model.paths),
        data_dir=source.data_dir,
        synthetic_data=source.synthetic,
        split=config.eval.split,
        # "" = the images as they are; else the sequences replaced by the FLAIR.
        missing_sequences=config.eval.missing_sequences,
        patients_seen_in_training=len(seen),
        # What ran the model: bf16 and int8 figures differ slightly from f32 ones.
        backend=model.backend,
        precision=model.precision,
    )
    if "members" in meta:  # an ensemble (backends.Ensemble.meta)
        summary["ensemble_members"] = meta["members"]
    if jax.process_index() == 0:
        grid = evaluator.results_grid(model, threshold)
        write_report(eval_dir, summary, patients, grid)
        dice = summary["dice_per_volume_mean"]
        dice = "–" if dice is None else f"{dice:.3f}"
        report.write_index(
            eval_dir,
            [dict(row, patient_id=pid) for pid, row in patients.items()],
            "eval",
            f"Evaluation: {source.data_dir}",
            f"{summary['num_patients']} patients, per-volume Dice mean {dice}; "
            f"checkpoint {summary['checkpoint']}",
        )
    logging.info(
        "Evaluation of step %d on %d patients: %s",
        summary["checkpoint_step"],
        summary["num_patients"],
        json.dumps(summary),
    )
    return summary


def _mean(values) -> float | None:
    """The mean of the values that are not None (None if there are none)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _sd(values) -> float | None:
    """The sample s.d. (ddof 1) of the values that are not None (None for fewer than 2)."""
    values = [v for v in values if v is not None]
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def cross_validate(config, workdir: str) -> dict:
    """Scores the runs of a k-fold cross-validation, each on its own validation fold,
    and writes the pooled report to `workdir/cv/`.

    The runs are `config.checkpoint` (else `workdir`) as `backends.model_paths` reads
    it: comma-separated, or a folder of runs (trained with `data.fold=0..k-1`). A run's
    fold is the patients of `data.dir` it did not train on (its meta lists the ones it
    did, as for `eval.split=val`); each is scored as `--mode=eval` scores it, at its own
    detection threshold.

    Writes:
        metrics.json: "folds" (one entry per run: fold, checkpoint, step, its patients
        and CV_METRICS), "mean" and "sd" (sample s.d.) of CV_METRICS over the folds, and
        "pooled": per-volume Dice over every patient; per_patient.csv: every patient
        once, with its fold; per_patient_dice.png.

    Returns:
        The metrics written to metrics.json.

    Raises:
        errors.ConfigError: fewer than two runs.
        errors.CheckpointError: two runs validate on the same patient (not folds of one
            split).
    """
    if jax.process_index() == 0:
        check_writable(workdir)
    paths = backends.model_paths(config.checkpoint or workdir, config.inference.backend)
    if len(paths) < 2:
        raise errors.ConfigError(
            f"config.checkpoint={config.checkpoint!r}: --mode=cv needs the runs of two folds "
            "or more (comma-separated, or a folder of runs), found "
            f"{len(paths)} ({', '.join(paths)})"
        )
    source, folds, patients, fold_of = None, [], {}, {}
    for fold, path in enumerate(paths):
        model = backends.restore(path, config.inference.backend, config)
        meta = model.meta
        fold_config = config_schema.checkpoint_config(config, meta)
        source = source or sources.open_source(fold_config, workdir, split=False)
        patient_ids, _ = patients_to_evaluate(source, meta["train_patients"], config.eval.split)
        for pid in patient_ids:
            if pid in fold_of:
                raise errors.CheckpointError(
                    f"{paths[fold_of[pid]]} and {path} both validate on patient {pid} "
                    "(neither trained on it): they are not folds of one split"
                )
            fold_of[pid] = fold
        threshold = model.threshold
        evaluator = Evaluator(source, fold_config, patient_ids)
        summary, rows = evaluator.run(model, threshold, f"cv fold {fold + 1}/{len(paths)}")
        folds.append(
            {
                "fold": fold,
                "checkpoint": os.path.abspath(path),
                "checkpoint_step": int(meta["step"]),
                "num_patients": summary["num_patients"],
                "num_slices": summary["num_slices"],
                "detection_threshold": threshold,
                **{k: summary[k] for k in CV_METRICS},
            }
        )
        patients.update({pid: dict(row, fold=fold) for pid, row in rows.items()})
    unscored = sorted(set(source.patient_ids) - set(fold_of))
    if unscored:
        logging.warning(
            "%d patients of %s are in no run's validation fold (every run trained on them): %s",
            len(unscored),
            source.data_dir,
            ", ".join(unscored),
        )
    patients = dict(sorted(patients.items()))
    volume_dice = [r["dice"] for r in patients.values() if r["true_area"] > 0]
    summary = {
        "num_folds": len(folds),
        "mean": {k: _mean(f[k] for f in folds) for k in CV_METRICS},
        "sd": {k: _sd(f[k] for f in folds) for k in CV_METRICS},
        "pooled": {
            "num_patients": len(patients),
            "volumes_with_tumor": len(volume_dice),
            "dice_per_volume_mean": _mean(volume_dice),
            "dice_per_volume_median": float(np.median(volume_dice)) if volume_dice else None,
        },
        "folds": folds,
        "data_dir": source.data_dir,
        "synthetic_data": source.synthetic,
        "postprocess": config.eval.postprocess,
        "missing_sequences": config.eval.missing_sequences,
    }
    if jax.process_index() == 0:
        fields = ("fold", *PATIENT_FIELDS)
        write_report(os.path.join(workdir, "cv"), summary, patients, fields=fields)
    dice = summary["mean"]["dice_per_volume_mean"], summary["sd"]["dice_per_volume_mean"]
    logging.info(
        "Cross-validation of %d folds, %d patients: Dice per volume %s ± %s",
        len(folds),
        len(patients),
        *dice,
    )
    return summary
