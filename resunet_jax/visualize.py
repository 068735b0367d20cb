"""Matplotlib figures of evaluation results (PNG, no display needed)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def per_patient_dice_figure(patients: dict, path: str):
    """Bar chart of per-volume Dice, one bar per patient with tumour, sorted.

    Args:
        patients: `metrics.per_patient` rows.
        path: output PNG path.
    """
    rows = sorted(
        ((pid, r["dice"]) for pid, r in patients.items() if r["true_area"] > 0),
        key=lambda item: item[1],
    )
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(rows) + 1.5), 4.0))
    dices = np.array([d for _, d in rows])
    ax.bar(range(len(rows)), dices, color="tab:green")
    if rows:
        ax.axhline(dices.mean(), color="k", ls="--", lw=1, label=f"mean {dices.mean():.3f}")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(rows)), [pid for pid, _ in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice per volume")
    ax.set_title("Per-patient Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
