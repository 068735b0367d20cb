"""Crash consistency of a workdir: a SIGKILL at each point of the save sequence, damaged
checkpoints, a full disk, a read-only workdir."""

import json
import os
import re
import subprocess
import sys

import pytest

from resunet_jax import checkpointing, errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Saves at 2, 4 (validated), 6 and 8 (validated); keep=1 makes the save of 4 delete 2.
RUN = [
    "--config=configs/tiny.py",
    "--config.num_train_steps=8",
    "--config.checkpoint_every_steps=2",
    "--config.eval_every_steps=4",
    "--config.log_every_steps=2",
    "--config.keep_checkpoints=1",
]


def _run(workdir, *flags, kill_at=None, expect_rc=0):
    """Runs launch.py (through tests/kill_at.py with `kill_at` = (point, step))."""
    flags = [*RUN, f"--workdir={workdir}", f"--config.data.prepared_dir={workdir}/prepared", *flags]
    entry = ["tests/kill_at.py", *map(str, kill_at)] if kill_at else ["launch.py"]
    proc = subprocess.run(
        [sys.executable, *entry, *flags], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    return proc.stderr


def _steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _readable(workdir):
    """The steps of `workdir` whose model and meta restore."""
    readable = []
    for step in _steps(workdir):
        try:
            checkpointing.restore_model(os.path.join(workdir, "checkpoints", str(step)))
        except errors.CheckpointError:
            continue
        readable.append(step)
    return readable


def _best(workdir):
    manager = checkpointing._manager(os.path.join(workdir, "checkpoints"), create=False)
    try:
        return manager.best_step()
    finally:
        manager.close()


def _errors(log):
    return [line for line in log.splitlines() if line.startswith(("E", "F"))]


def test_a_kill_at_each_point_of_the_save_sequence_then_the_same_command_finishes(tmp_path):
    """Kills one run at each point (tests/kill_at.py); each rerun must resume from the
    newest step on disk and get past it, and the last one finishes."""
    workdir = str(tmp_path / "run")
    chain = [
        # (point, step of the save it strikes, step the rerun must resume from)
        ("before_save", 4, None),  # validated, nothing written: like a kill mid-step
        ("before_commit", 4, 2),  # a temporary folder for 4, removed on resume
        ("before_cleanup", 4, 2),  # 4 committed, 2 not yet deleted: both kept
        ("during_cleanup", 6, 4),  # 2 half deleted while saving 6: never read again
        ("after_save", 8, 6),  # the case: the best and last step just written
        ("final_eval", 8, 8),  # metrics.json written, the rest of the report not
    ]
    for point, step, resumed in chain:
        log = _run(workdir, kill_at=(point, step), expect_rc=-9)
        assert (f"Resuming from step {resumed}" in log) if resumed else "Resuming" not in log
        temporary = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
        assert bool(temporary) == (point == "before_commit"), temporary
    log = _run(workdir)
    assert "Resuming from step 8" in log
    assert 8 in _readable(workdir) and _best(workdir) in _readable(workdir)
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        assert json.load(f)["checkpoint_step"] == _best(workdir)
    # The half-written report was kept aside, not mixed with the new one.
    assert [n for n in os.listdir(workdir) if n.startswith("eval_")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run: steps 4 (validated) and 8 (validated, the newest) kept."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    _run(workdir)
    return workdir


def _damage(workdir, step, how):
    """Damages a step: "truncate" cuts every file of its model item to a third, "garble"
    flips bytes in the array data of every item (the metadata stays readable, so orbax
    fails inside tensorstore's reads, whichever item it reads first)."""
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    for folder, _, files in os.walk(os.path.join(step_dir, "model" if how == "truncate" else "")):
        for name in files:
            path = os.path.join(folder, name)
            if how == "truncate":
                with open(path, "r+b") as f:
                    f.truncate(max(os.path.getsize(path) // 3, 1))
            elif os.path.basename(folder) == "d":
                with open(path, "r+b") as f:
                    data = bytearray(f.read())
                    data[::7] = bytes(b ^ 0xFF for b in data[::7])
                    f.seek(0)
                    f.write(data)


def _one_line(log):
    """The log holds one error line and none of orbax's or tensorstore's noise."""
    (error,) = _errors(log)
    for noise in ("Traceback", "Event loop is closed", "never retrieved"):
        assert noise not in log, log[-3000:]
    return error


@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_a_workdir_whose_checkpoints_are_all_damaged_keeps_refusing(finished, copy_run, how):
    workdir = copy_run(finished)
    steps = _steps(workdir)
    for step in steps:
        _damage(workdir, step, how)
    for _ in range(2):  # the second start must not train from step 0 over them
        error = _one_line(_run(workdir, expect_rc=1))
        assert "no readable checkpoint" in error and "move" in error
        assert _steps(workdir) == []
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
        f"{s}.damaged" for s in steps
    ]
    # Moving the folder away is the deliberate fresh start the message names.
    os.rename(os.path.join(workdir, "checkpoints"), os.path.join(workdir, "old_checkpoints"))
    saver = checkpointing.Checkpointer(workdir, keep=1)
    assert saver.restore_latest(None) is None
    saver.close()


def test_a_damaged_checkpoint_given_to_eval_is_one_line(finished, copy_run, tmp_path):
    workdir = copy_run(finished)
    for step in _steps(workdir):
        _damage(workdir, step, "garble")
    log = _run(tmp_path / "eval", "--mode=eval", f"--config.checkpoint={workdir}", expect_rc=1)
    assert "no readable checkpoint" in _one_line(log)


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of 1.3 MB (a training run fills it); skips where mount is not
    allowed."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1300k", "tmpfs", str(folder)]
    if subprocess.run(mount).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield str(folder)
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_gives_one_line_naming_the_path_and_keeps_earlier_steps(small_disk):
    workdir = os.path.join(small_disk, "run")
    log = _run(workdir, "--config.data.prepared_dir=" + small_disk + "/../prepared", expect_rc=1)
    (error,) = _errors(log)
    assert re.search(r"checkpoints: cannot write checkpoint step \d+ \(No space left", error)
    assert "Traceback" not in log and "Event loop is closed" not in log
    assert _readable(workdir)  # the steps written before the disk filled
    # Full before the run starts: one line naming the workdir, before any work.
    with open(os.path.join(small_disk, "filler"), "wb") as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    log = _run(os.path.join(small_disk, "run2"), expect_rc=1)
    (error,) = _errors(log)
    assert "run2: cannot write there (No space left on device)" in error
    assert "Traceback" not in log


def test_a_read_only_workdir_is_refused_before_evaluating(finished, tmp_path, copy_run):
    workdir = copy_run(finished)
    before = sorted(os.listdir(workdir))
    if subprocess.run(["mount", "--bind", "-o", "ro", workdir, workdir]).returncode:
        pytest.skip("bind-mounting needs root")
    try:
        for mode in ("eval", "predict"):  # training: see test_a_full_disk_...
            log = _run(
                workdir,
                f"--mode={mode}",
                f"--config.predict.input={workdir}/synthetic_data",
                f"--config.data.prepared_dir={tmp_path}/prepared",
                expect_rc=1,
            )
            (error,) = _errors(log)
            assert f"{workdir}: cannot write there (Read-only file system)" in error, mode
            assert "Traceback" not in log and "Evaluation of step" not in log
    finally:
        subprocess.run(["umount", workdir], check=True)
    assert sorted(os.listdir(workdir)) == before


def test_a_mask_given_as_the_predict_input_is_refused(finished, tmp_path):
    patient = os.path.join(finished, "synthetic_data", sorted(os.listdir(
        os.path.join(finished, "synthetic_data")))[0])  # fmt: skip
    mask = os.path.join(patient, sorted(n for n in os.listdir(patient) if "_mask" in n)[0])
    log = _run(str(tmp_path / "pred"), "--mode=predict", f"--config.checkpoint={finished}",
               f"--config.predict.input={mask}", expect_rc=1)  # fmt: skip
    (error,) = _errors(log)
    assert f"{mask}: a ground-truth mask" in error and "Traceback" not in log
    assert not os.path.exists(tmp_path / "pred" / "predict")
