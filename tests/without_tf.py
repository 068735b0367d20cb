"""Runs launch.py in a subprocess, optionally where TensorFlow cannot be imported.

Some accelerator machines have no TensorFlow: `sys.modules[name] = None` makes any
`import tensorflow` (or `tensorflow_datasets`) in the run raise ImportError, as there.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BLOCKED = (
    "import runpy, sys; "
    "sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None; "
    "sys.argv[0] = 'launch.py'; runpy.run_path('launch.py', run_name='__main__')"
)


def launch(*flags, tensorflow: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `python launch.py *flags` in the repository; TF unimportable unless `tensorflow`.

    Raises:
        AssertionError: the run failed (its log's tail in the message).
    """
    command = [sys.executable, "launch.py"] if tensorflow else [sys.executable, "-c", _BLOCKED]
    proc = subprocess.run(
        [*command, *flags], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
