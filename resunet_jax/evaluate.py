"""Evaluation over a split: per-slice counts on the devices, per-patient metrics on the host.

`evaluate_checkpoint` is what both `--mode=eval` and the end of training run, so the
two write identical reports: `eval/metrics.json`, `eval/per_patient.csv` and a figure.
"""

import collections
import csv
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from resunet_jax import checkpointing, input_pipeline, metrics, models, parallel, train, visualize
from resunet_jax.data import sources

# Config fields that define what a checkpoint's model expects; evaluation takes them
# from the checkpoint, not from the command line.
MODEL_FIELDS = ("model", "data.image_size", "data.normalization")


class Evaluator:
    """Evaluates model variables on every slice of a set of patients.

    Args:
        source: the prepared data source.
        config: run config (model, data.image_size, data.normalization, eval.batch_size).
        patient_ids: patients to evaluate.
    """

    def __init__(self, source: sources.Source, config, patient_ids):
        devices = jax.local_device_count()
        self.batch_size = -(-config.eval.batch_size // devices) * devices
        self.step = train.pmapped_eval_step(models.create_model(config.model))
        self.dataset = input_pipeline.create_eval_dataset(
            source.builder, patient_ids, config, self.batch_size
        )

    def run(self, params, batch_stats) -> tuple[dict, dict]:
        """Returns (metrics, per-patient rows) as `metrics.summarize` defines them."""
        variables = {"params": params, "batch_stats": batch_stats}
        columns = collections.defaultdict(list)
        for batch in input_pipeline.as_numpy(self.dataset):
            padded, n = parallel.pad_batch(
                {"image": batch["image"], "mask": batch["mask"]}, self.batch_size
            )
            _, out = self.step(variables, parallel.split_for_devices(padded))
            for k, v in jax.device_get(out).items():
                columns[k].append(v.reshape(-1)[:n])
            columns["patient_id"].append(batch["patient_id"])
        if not columns:
            raise ValueError("evaluation split is empty")
        cols = {k: np.concatenate(v) for k, v in columns.items()}
        counts = {k: cols[k] for k in ("intersection", "pred_area", "true_area")}
        # Until a detection head decides, a slice is called tumour when its mask is non-empty.
        return metrics.summarize(cols["patient_id"], counts, cols["pred_area"] > 0)


def checkpoint_config(config: ml_collections.ConfigDict, meta: dict):
    """`config` with the model-defining fields (MODEL_FIELDS) of the checkpoint's config."""
    saved = ml_collections.ConfigDict(meta["config"])
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for field in MODEL_FIELDS:
            *parents, leaf = field.split(".")
            dst, src = config, saved
            for p in parents:
                dst, src = dst[p], src[p]
            if dst[leaf] != src[leaf] and dst[leaf] is not None:
                logging.info("Using the checkpoint's %s=%s (config had %s)", field, src[leaf],
                             dst[leaf])  # fmt: skip
            dst[leaf] = src[leaf]
    return config


def write_report(eval_dir: str, summary: dict, patients: dict):
    """Writes metrics.json, per_patient.csv and the per-patient Dice figure.

    Files are written to a temporary name and renamed, so a crash never leaves a
    half-written report in place of an earlier one.
    """
    os.makedirs(eval_dir, exist_ok=True)

    def replace(name, write):
        path = os.path.join(eval_dir, name)
        with open(path + ".tmp", "w", newline="") as f:
            write(f)
        os.replace(path + ".tmp", path)

    replace("metrics.json", lambda f: json.dump(summary, f, indent=2))

    def write_csv(f):
        fields = ["patient_id", "num_slices", "dice", "iou", "true_area", "pred_area",
                  "intersection"]  # fmt: skip
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        for pid, row in patients.items():
            writer.writerow(dict(row, patient_id=pid))

    replace("per_patient.csv", write_csv)
    visualize.per_patient_dice_figure(patients, os.path.join(eval_dir, "per_patient_dice.png"))


def evaluate_checkpoint(config, workdir: str, source: sources.Source | None = None) -> dict:
    """Restores a checkpoint, evaluates it on `eval.split`, and writes `workdir/eval/`.

    The checkpoint is `config.checkpoint` if set, else the workdir's best (else latest).

    Args:
        config: run config.
        workdir: run directory.
        source: an already opened data source (training passes its own).

    Returns:
        The metrics written to metrics.json.
    """
    path = config.checkpoint or workdir
    variables, meta = checkpointing.restore_model(path)
    config = checkpoint_config(source.config if source else config, meta)
    source = source or sources.open_source(config, workdir)
    evaluator = Evaluator(source, config, source.eval_ids)
    summary, patients = evaluator.run(variables["params"], variables["batch_stats"])
    summary.update(
        checkpoint_step=int(meta["step"]),
        checkpoint=os.path.abspath(path),
        data_dir=source.data_dir,
        synthetic_data=source.synthetic,
        split=config.eval.split,
    )
    if jax.process_index() == 0:
        write_report(os.path.join(workdir, "eval"), summary, patients)
    logging.info("Evaluation of step %d on %d patients: %s", summary["checkpoint_step"],
                 summary["num_patients"], json.dumps(summary))  # fmt: skip
    return summary
