"""Which data a run uses: the folder (real or synthetic), its patient split and, for the
tf.data batch source only, its prepared TFDS (`tfds_lgg`; nothing else here imports TF).

With `data.dir` empty the run generates synthetic phantom data in the kaggle_3m layout
under the workdir and uses it through exactly the same path as real data.
"""

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from resunet_jax.data import lgg, synthetic

SYNTHETIC_DIR = "synthetic_data"


@dataclasses.dataclass
class Source:
    """A data source and its patient split.

    Attributes:
        data_dir: the kaggle_3m-style folder.
        slices: its slices (`lgg.discover`).
        builder: its prepared `tfds_lgg.LggBuilder`; None unless opened with `tfds=True`.
        patient_ids: every patient of `data_dir`.
        train_ids, val_ids: the patient-level split (both empty when not asked for).
        synthetic: whether `data_dir` holds generated phantom data.
    """

    data_dir: str
    slices: list
    builder: Any
    patient_ids: list
    train_ids: list
    val_ids: list
    synthetic: bool


def prepared_root(config) -> str:
    return os.path.expanduser(config.data.prepared_dir or "~/.cache/resunet_jax/prepared")


def open_source(
    config: ml_collections.ConfigDict, workdir: str, split: bool = True, tfds: bool = False
) -> Source:
    """Finds or generates the data, splits its patients and, with `tfds`, prepares them.

    `split=False` skips the k-fold split (and its need for at least `data.num_folds`
    patients): evaluating a checkpoint that lists its training patients needs none.
    `tfds=True` prepares the TFDS once (the tf.data batch source reads it; only then is
    TensorFlow imported): process 0 prepares, the other processes wait, then open it.
    """
    is_synthetic = not config.data.dir
    if is_synthetic:
        data_dir = os.path.join(workdir, SYNTHETIC_DIR)
        syn = config.synthetic
        logging.info(
            "config.data.dir is empty: using SYNTHETIC phantom data (%d patients x %d slices, "
            "%d px) generated under %s. Pass --config.data.dir=PATH/kaggle_3m for real data.",
            syn.num_patients,
            syn.slices_per_patient,
            syn.size,
            data_dir,
        )
        if jax.process_index() == 0:
            synthetic.write_synthetic_dataset(
                data_dir, syn.num_patients, syn.slices_per_patient, syn.size, seed=syn.seed
            )
        multihost_utils.sync_global_devices("resunet_jax synthetic data written")
    else:
        data_dir = os.path.abspath(os.path.expanduser(config.data.dir))
    slices = lgg.discover(data_dir)
    ids = lgg.patient_ids(slices)
    train_ids, val_ids = [], []
    if split:
        train_ids, val_ids = lgg.split_patients(
            ids, config.data.num_folds, config.data.fold, config.data.split_seed
        )
    builder = None
    if tfds:
        from resunet_jax.data import tfds_lgg

        root = prepared_root(config)
        if jax.process_index() == 0:
            builder = tfds_lgg.prepare(data_dir, root, slices)
        multihost_utils.sync_global_devices("resunet_jax data prepared")
        if jax.process_index() != 0:
            builder = tfds_lgg.prepare(data_dir, root, slices)
    logging.info(
        "Data %s: %d patients, %d slices (%s)",
        data_dir,
        len(ids),
        len(slices),
        f"{len(train_ids)} train, {len(val_ids)} val patients" if split else "not split",
    )
    return Source(data_dir, slices, builder, ids, train_ids, val_ids, is_synthetic)
