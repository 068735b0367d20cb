"""Test set-up: four fake CPU devices (set before JAX starts), shared fixtures."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny synthetic kaggle_3m folder (6 patients x 6 slices, 32 px), shared by tests."""
    from resunet_jax.data import synthetic

    root = tmp_path_factory.mktemp("kaggle_3m")
    synthetic.write_synthetic_dataset(root, num_patients=6, slices_per_patient=6, size=32)
    return str(root)
