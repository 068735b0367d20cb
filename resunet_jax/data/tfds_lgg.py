"""The TFDS form of a kaggle_3m-style folder, read by the tf.data batch source.

The only data module that imports TensorFlow (Datasets). TFDS cannot decode TIFF:
`LggBuilder` decodes with tifffile (`lgg.read_slice`) and stores lossless PNG, once per
source folder (see `prepare`).
"""

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resunet_jax.data import lgg

# The one TFDS split holding every slice; patient-level splits are selected at read time.
SPLIT = "slices"


class LggBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of one kaggle_3m-style folder (manual dir), one split `SPLIT`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Slices decoded with tifffile, stored as PNG."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation and pass its "
        "kaggle_3m folder as --config.data.dir."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "mask": tfds.features.Image(shape=(None, None, 1)),
                    "patient_id": tfds.features.Text(),
                    "slice_index": np.int32,
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        return {SPLIT: self._generate_examples(str(dl_manager.manual_dir))}

    def _generate_examples(self, data_dir: str):
        for s in lgg.discover(data_dir):
            image, mask = lgg.read_slice(s)
            yield (
                f"{s.patient_id}_{s.index}",
                {
                    "image": image,
                    "mask": mask[..., None],
                    "patient_id": s.patient_id,
                    "slice_index": s.index,
                },
            )


def prepare(data_dir: str, prepared_root: str, slices: list[lgg.Slice]) -> LggBuilder:
    """Prepares (once) and returns the TFDS builder of `data_dir`.

    Prepared data live in `prepared_root/<fingerprint>`, so two source folders never
    share prepared data and an edited folder is prepared again.

    Args:
        data_dir: kaggle_3m-style folder.
        prepared_root: parent folder of all prepared data.
        slices: `lgg.discover(data_dir)`.

    Safe when several processes prepare the same folder at once: the first copy wins.

    Raises:
        DataError: naming every unusable file, before anything is prepared.
    """
    # TensorFlow is the host's input pipeline here: it must never take accelerator
    # memory from JAX. Set before TF's first op initialises its devices.
    tf.config.set_visible_devices([], "GPU")
    root = os.path.join(prepared_root, lgg.fingerprint(data_dir, slices))
    builder = LggBuilder(data_dir=root)
    if not builder.is_prepared():
        problems = lgg.validate(slices)
        if problems:
            raise lgg.unusable_files(data_dir, problems)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=data_dir)
        )
    except FileExistsError:
        # Another job (fold runs started together on a cluster) prepared the same folder
        # first and TFDS cannot rename over it; that copy is the same data, so use it.
        # No lock: flock is unreliable on the shared filesystems such jobs run on.
        builder = LggBuilder(data_dir=root)
        if not builder.is_prepared():
            raise
    return builder
