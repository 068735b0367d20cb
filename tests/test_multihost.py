"""Two processes x two CPU devices train like one process x four devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from resunet_jax import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    "--config=configs/tiny.py",
    "--config.optimizer.name=sgd",  # see test_train: Adam would amplify round-off
    "--config.optimizer.learning_rate=0.05",
    "--config.optimizer.warmup_steps=0",
    "--config.eval_every_steps=1000",
]


def _env(num_devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    prepared = f"--config.data.prepared_dir={tmp_path}/prepared"
    single = subprocess.run(
        [sys.executable, "launch.py", f"--workdir={tmp_path}/single", *FLAGS, prepared],
        cwd=REPO,
        env=_env(4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "launch.py",
                f"--workdir={tmp_path}/multi",
                *FLAGS,
                prepared,
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ],
            cwd=REPO,
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    assert "JAX process 1/2" in logs[1] and "over 4 devices" in logs[0]
    a, _ = checkpointing.restore_model(f"{tmp_path}/single/checkpoints")
    b, meta = checkpointing.restore_model(f"{tmp_path}/multi/checkpoints")
    assert meta["step"] == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert os.path.exists(f"{tmp_path}/multi/eval/metrics.json")
