"""A tiny ResUNet on tiny synthetic data, for tests and CI (seconds per run).

python launch.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

from configs import resunet


def get_config():
    config = resunet.get_config()
    config.model.stem_features = 4
    config.model.features = (8, 16)
    config.model.bottleneck_features = 16
    config.synthetic.num_patients = 6
    config.synthetic.slices_per_patient = 6
    config.synthetic.size = 32
    config.data.num_folds = 3
    config.data.image_size = 32
    config.data.shuffle_buffer = 64
    config.batch_size = 4
    config.num_train_steps = 6
    config.log_every_steps = 2
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    config.eval.batch_size = 8
    return config
