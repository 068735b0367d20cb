"""Bad config values stop a run before any work, in one line naming the field."""

import ast
import os
import subprocess
import sys

import pytest

from configs import resunet, tiny
from resunet_jax import backends, config_schema, errors, inputs, losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("E") and "] " in line]


@pytest.mark.parametrize(
    "field, value, mode",
    [
        ("batch_size", 0, "train"),
        ("batch_size", 6, "train"),  # 4 devices in the tests (conftest.py)
        ("data.image_size", 36, "train"),  # tiny's model pools 3 times: a multiple of 8
        ("data.image_size", 0, "eval"),
        ("data.pipeline", "gpu", "train"),
        ("data.fold", 3, "train"),  # tiny has 3 folds
        ("data.num_folds", 1, "train"),
        ("data.normalization", "z", "eval"),
        ("data.tumor_fraction", 1.5, "train"),
        ("num_train_steps", -1, "train"),
        ("checkpoint_every_steps", 0, "train"),
        ("ema_decay", 1.0, "train"),
        ("loss", "l2", "train"),
        ("optimizer.name", "lamb", "train"),
        ("optimizer.schedule", "step", "train"),
        ("model.dtype", "float64", "train"),
        ("model.deep_supervision", 3, "train"),
        ("model.no_contrast_expert", True, "train"),
        ("eval.split", "test", "eval"),
        ("eval.postprocess", "biggest", "predict"),
        ("eval.missing_sequences", "flair", "eval"),
        ("augment.missing_sequences", -0.1, "train"),
        ("augment.skull_strip", 1.5, "train"),
        ("augment.blur", -0.2, "train"),
        ("augment.bias_field", -0.3, "train"),
        ("augment.fov", 1.2, "train"),
        ("augment.window", 0.5, "train"),
        ("predict.input", "", "predict"),
    ],
)
def test_bad_value_is_refused_naming_the_field(field, value, mode):
    config = tiny.get_config()
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    if mode == "predict" and field != "predict.input":
        config.predict.input = "scans"
    with pytest.raises(errors.ConfigError, match=rf"^config\.{field}={value!r}: "):
        config_schema.validate(config, mode)


def test_shipped_configs_pass():
    from configs import domain_aug, resunet

    for mode in config_schema.MODES:
        for config in (resunet.get_config(), tiny.get_config(), domain_aug.get_config()):
            config.predict.input = "scans"
            config_schema.validate(config, mode)


@pytest.mark.parametrize(
    "flag, field",
    [
        ("--config.batch_size=0", "batch_size"),
        ("--config.batch_size=6", "batch_size"),
        ("--config.data.image_size=36", "data.image_size"),
        ("--config.loss=l2", "loss"),
    ],
)
def test_bad_value_through_launch_is_one_line_and_writes_nothing(tmp_path, flag, field):
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "launch.py",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.prepared_dir={tmp_path}/prepared",
        flag,
    ]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and f"config.{field}=" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(workdir) and not os.path.exists(tmp_path / "prepared")


def test_each_allowed_value_list_is_the_registry_it_names():
    assert tuple(losses.LOSSES) == config_schema.LOSSES
    assert tuple(inputs.MISSING_SEQUENCES) == config_schema.MISSING_SEQUENCES
    assert (*backends.REGISTRY, "auto") == config_schema.BACKENDS  # auto: resolve_backend


def test_the_schema_imports_no_training_code():
    with open(config_schema.__file__) as f:
        tree = ast.parse(f.read())
    ours = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resunet_jax")
    }
    assert ours == {"resunet_jax.errors"}


def test_defaults_resolve_once_by_data_source_and_resolving_again_changes_nothing():
    config = resunet.get_config()
    assert config.data.image_size is None
    synthetic = config_schema.resolve_defaults(config)
    assert (synthetic.data.image_size, synthetic.num_train_steps) == (64, 800)
    config.data.dir = "/somewhere/kaggle_3m"
    config.num_train_steps = 7  # given explicitly: it wins
    lgg = config_schema.resolve_defaults(config)
    assert (lgg.data.image_size, lgg.num_train_steps, lgg.eval_every_steps) == (128, 7, 250)
    assert config_schema.resolve_defaults(lgg).to_dict() == lgg.to_dict()
    assert config.data.image_size is None  # the given config is not changed
