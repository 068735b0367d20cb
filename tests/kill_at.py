"""`launch.py` that SIGKILLs itself at one named point of the checkpoint save sequence.

python tests/kill_at.py POINT STEP [launch.py flags]

Points, in the order a save of step STEP passes them:
  before_save      the step trained (and validated, on an eval step), nothing written
  before_commit    every item written to `STEP.orbax-checkpoint-tmp*`, not yet renamed
  before_cleanup   STEP committed, the older steps orbax drops not yet deleted
  during_cleanup   an older step half deleted
  after_save       the save returned
  final_eval       the final report half written (metrics.json and per_patient.csv)
Test-only: it patches orbax and this project from outside, so the code under test is
the code users run.
"""

import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _die():
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _patch(point: str, step: int):
    from orbax.checkpoint._src.path import atomicity, deleter

    from resunet_jax import checkpointing, visualize

    saving = {"step": None}
    save = checkpointing.Checkpointer.save

    def patched_save(self, state, meta, val_metrics=None):
        saving["step"] = int(meta["step"])
        if point == "before_save" and saving["step"] == step:
            _die()
        save(self, state, meta, val_metrics)
        if point == "after_save" and saving["step"] == step:
            _die()

    checkpointing.Checkpointer.save = patched_save

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def patched_finalize(self, *args, **kwargs):
        if point == "before_commit" and self._final_path.name == str(step):
            _die()
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = patched_finalize

    delete = deleter.StandardCheckpointDeleter._delete_step_permanently

    def patched_delete(self, old_step, target):
        if saving["step"] == step and point == "before_cleanup":
            _die()
        if saving["step"] == step and point == "during_cleanup":
            files = sorted(os.path.join(d, n) for d, _, names in os.walk(target) for n in names)
            for path in files[: len(files) // 2]:
                os.remove(path)
            _die()
        return delete(self, old_step, target)

    deleter.StandardCheckpointDeleter._delete_step_permanently = patched_delete

    figure = visualize.per_patient_dice_figure

    def patched_figure(*args, **kwargs):
        if point == "final_eval":
            _die()
        return figure(*args, **kwargs)

    visualize.per_patient_dice_figure = patched_figure


if __name__ == "__main__":
    from absl import app

    import launch

    point, step = sys.argv[1], int(sys.argv[2])
    _patch(point, step)
    app.run(launch.main, argv=[os.path.join(REPO, "launch.py"), *sys.argv[3:]])
