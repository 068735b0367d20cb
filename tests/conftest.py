"""Test set-up: four fake CPU devices and a compilation cache (set before JAX starts),
shared fixtures."""

import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests start `launch.py` a dozen times on the tiny config, and each start would
# compile the same programs again (most of a tiny run's minute on 2 cores). JAX's
# persistent cache, new for each session and inherited by the subprocesses, compiles
# each once; every program is still compiled from this session's code. pytest-xdist
# workers inherit the controller's folder, so they share it too.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


def pytest_configure(config):
    # As in launch.py: tf.data runs on the host, and TensorFlow must not take accelerator
    # memory from JAX.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny synthetic kaggle_3m folder (6 patients x 6 slices, 32 px), shared by tests."""
    from resunet_jax.data import synthetic

    root = tmp_path_factory.mktemp("kaggle_3m")
    synthetic.write_synthetic_dataset(root, num_patients=6, slices_per_patient=6, size=32)
    return str(root)


@pytest.fixture(scope="session")
def folds(tiny_data, tmp_path_factory):
    """Three tiny "fold" runs of tiny_data's 6 patients (3-fold split), in one folder."""
    from test_predict import _export_tiny

    from resunet_jax.data import lgg

    runs = tmp_path_factory.mktemp("folds")
    ids = lgg.patient_ids(lgg.discover(tiny_data))
    for k in range(3):
        train_ids, _ = lgg.split_patients(ids, 3, k, seed=0)
        _export_tiny(runs / f"fold_{k}", k, train_ids, threshold=0.5)
    return str(runs), ids


@pytest.fixture
def copy_run(tmp_path):
    """Copies a module's finished run into this test's tmp_path, for tests that change it.

    Returns:
        A function: workdir -> the copy's path.
    """

    def copy(workdir):
        return shutil.copytree(workdir, str(tmp_path / "run"))

    return copy


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)
