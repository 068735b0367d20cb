"""Matplotlib figures of evaluation results (PNG, no display needed).

Figures are drawn on their own Agg canvas, not through pyplot: no global backend to
choose, no display needed, and nothing to close.
"""

import numpy as np
from matplotlib import image as mpl_image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(**kwargs) -> Figure:
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


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
    fig = _figure(figsize=(max(4.0, 0.35 * len(rows) + 1.5), 4.0))
    ax = fig.subplots()
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


def _overlay(image, mask, color):
    """RGB uint8 [H, W, 3] with `mask` pixels tinted `color` (r, g, b)."""
    out = image.astype(np.float32).copy()
    tint = np.array(color, np.float32)
    out[mask > 0] = 0.5 * out[mask > 0] + 0.5 * tint
    return out.astype(np.uint8)


GRID_COLUMNS = (
    "Brain MRI",
    "Original mask",
    "Predicted mask",
    "MRI + original mask",
    "MRI + predicted mask",
)


def results_grid(images, true_masks, pred_masks, titles=None) -> np.ndarray:
    """The original project's results grid, one row per slice.

    Columns: GRID_COLUMNS; the ground truth is overlaid in red, the prediction in green.

    Args:
        images: [N, H, W, 3] uint8 slices.
        true_masks: [N, H, W] {0, 1} ground truth.
        pred_masks: [N, H, W] {0, 1} predictions.
        titles: optional N row labels (e.g. patient and slice).

    Returns:
        The rendered figure, [height, width, 3] uint8.
    """
    n = len(images)
    fig = _figure(figsize=(12.5, 2.6 * n))
    axes = fig.subplots(n, 5, squeeze=False)
    for i in range(n):
        panels = (
            images[i],
            true_masks[i],
            pred_masks[i],
            _overlay(images[i], true_masks[i], (255, 0, 0)),
            _overlay(images[i], pred_masks[i], (0, 255, 0)),
        )
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(
                panel,
                cmap="gray" if panel.ndim == 2 else None,
                vmin=0,
                vmax=1 if panel.ndim == 2 else None,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(GRID_COLUMNS[j], fontsize=10)
        if titles is not None:
            axes[i, 0].set_ylabel(titles[i], fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def overlay_png(image, mask, path: str):
    """Writes `image` [H, W, 3] uint8 with `mask` [H, W] outlined in green as a PNG."""
    mpl_image.imsave(path, _overlay(image, mask, (0, 255, 0)))


def save_png(array, path: str):
    """Writes an [H, W, 3] uint8 array as a PNG."""
    mpl_image.imsave(path, array)
