"""Installs resunet_jax: `pip install -e ".[test]"` (CPU jax; add your jax[cuda] on top)."""

from setuptools import find_packages, setup

# --mode=export and inference.backend=onnx (the tests export too). jax2onnx 0.13 and later
# require orbax-checkpoint < 0.11.37, which conflicts with the orbax this project uses.
ONNX = ["jax2onnx>=0.12.5,<0.13", "onnx>=1.20", "onnxruntime>=1.24"]
# inference.backend=openvino (the fastest CPU inference: bf16 where the CPU has it) and
# --mode=export --config.export.int8=True (NNCF's post-training quantization).
OPENVINO = [*ONNX, "openvino>=2026.4", "nncf>=3.4"]

setup(
    name="resunet_jax",
    version="0.1.0",
    description="ResUNet brain-tumour (LGG) detection and segmentation in JAX/Flax",
    packages=find_packages(include=["resunet_jax", "resunet_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.7",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.12",
        "numpy",
        "scipy",
        "tifffile",
        "nibabel",  # NIfTI volumes in and out (predict)
        "pydicom",  # DICOM series in (predict)
        "tensorflow-cpu>=2.18",
        "tensorflow-datasets>=4.9.8",
        "importlib_resources",  # needed by tensorflow-datasets, not declared by it
        "absl-py",
        "ml-collections",
        "matplotlib",
        "pillow",  # the previews (visualize.volume_preview)
        "tensorboard",
        "tqdm",  # progress bars on a terminal (progress.py)
    ],
    # The report test renders predict/index.html in Debian's chromium (.ci/run installs it).
    extras_require={
        "onnx": ONNX,
        "openvino": OPENVINO,
        "test": ["pytest", "pytest-xdist", "ruff", "selenium", *OPENVINO],
    },
    entry_points={"console_scripts": ["resunet-predict=resunet_jax.cli:main"]},
)
