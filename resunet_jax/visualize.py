"""Figures of evaluation results (PNG, no display needed).

Matplotlib figures are drawn on their own Agg canvas, not through pyplot: no global
backend to choose, no display needed, and nothing to close. The per-patient previews
are composed as arrays and written by Pillow.
"""

import numpy as np
from matplotlib import image as mpl_image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from resunet_jax import postprocess

# The longer side of a preview's slice panels, px (the LGG slices' own 256).
PREVIEW_SIDE = 256


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


def preview_slices(masks, max_slices: int = 6) -> np.ndarray:
    """Indices of the slices a preview shows: up to `max_slices` evenly spaced over the
    slices with tumour in `masks` [Z, H, W] (any of them), always with the largest one;
    the middle slices if none has any."""
    area = np.asarray(masks).reshape(len(masks), -1).sum(axis=1)
    tumour = np.flatnonzero(area)
    if not len(tumour):
        middle = len(masks) // 2
        return np.arange(max(0, middle - 1), min(len(masks), middle + 2))
    steps = np.linspace(0, len(tumour) - 1, min(max_slices, len(tumour))).round()
    picked = tumour[steps.astype(int)]
    picked = set(picked.tolist())
    if int(tumour[np.argmax(area[tumour])]) not in picked:
        picked.discard(min(picked, key=lambda z: area[z]))
        picked.add(int(tumour[np.argmax(area[tumour])]))
    return np.array(sorted(picked))


def volume_preview(flair, masks, path: str, title: str, reference=None, max_slices: int = 6):
    """Writes a patient's preview PNG: the slices with tumour (`preview_slices`), the
    prediction outlined in green on the FLAIR (and the reference in red, if given).

    Drawn with numpy and Pillow, not matplotlib: an evaluation writes one per patient,
    and a figure with its axes cost ten times the whole picture.

    Args:
        flair: [Z, h, w] FLAIR slices (any numeric type; each shown over its own range).
            May be smaller than the masks (the model's input side): it is stretched
            over the masks' extent.
        masks: [Z, H, W] bool predicted masks.
        path: output PNG path.
        title: title above the slices (patient, lesion volume, review flag, notes); lines
            longer than the picture wrap.
        reference: optional [Z, H, W] bool ground truth.
        max_slices: most slices shown.
    """
    masks = np.asarray(masks, bool)
    shown = preview_slices(masks if reference is None else masks | reference, max_slices)
    height, width = masks.shape[1:]
    scale = PREVIEW_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # Pillow's (W, H)
    panels = []
    for z in shown:
        panel = np.repeat(_gray(flair[z], size)[..., None], 3, axis=2)
        for mask, color in ((reference, (255, 0, 0)), (masks, (0, 255, 0))):
            if mask is not None and mask[z].any():
                panel[_outline(_resized_mask(mask[z], size))] = color
        panels.append(panel)
    # Text big enough to read where the report page shows the picture at half its size.
    text_size, line, pad = 16, 20, 4  # px: the font, a line of text, margins and gaps
    font = ImageFont.load_default(size=text_size)
    full_width = pad + len(panels) * (size[0] + pad)
    lines = _wrapped(title, font, full_width - 2 * pad)
    top = pad + line * len(lines) + pad
    picture = Image.new("RGB", (full_width, top + line + size[1] + pad), "white")
    draw = ImageDraw.Draw(picture)
    draw.multiline_text(
        (full_width // 2, pad),
        "\n".join(lines),
        fill="black",
        font=font,
        anchor="ma",
        spacing=line - text_size,
        align="center",
    )
    for i, (z, panel) in enumerate(zip(shown, panels, strict=True)):
        x = pad + i * (size[0] + pad)
        draw.text((x + size[0] // 2, top), f"slice {z}", fill="black", font=font, anchor="ma")
        picture.paste(Image.fromarray(panel), (x, top + line))
    picture.save(path, compress_level=1)  # light compression: one per patient


def _gray(image, size) -> np.ndarray:
    """[h, w] image over its own range -> [H, W] uint8 gray, bilinear to `size` (W, H)."""
    image = np.asarray(image, np.float32)
    low, high = image.min(), image.max()
    image = (image - low) * (255 / (high - low)) if high > low else np.zeros_like(image)
    resized = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0, 255).astype(np.uint8)


def _resized_mask(mask, size) -> np.ndarray:
    """[H, W] bool -> nearest-neighbour resize to `size` (W, H), bool."""
    resized = Image.fromarray(np.asarray(mask, np.uint8) * 255).resize(
        size, Image.Resampling.NEAREST
    )
    return np.asarray(resized) > 127


def _outline(mask) -> np.ndarray:
    """A two-pixel band along the border of `mask` [H, W] bool: one pixel inside, one out."""
    band = np.zeros(mask.shape, bool)
    box = postprocess.bounding_box(mask)
    if box is None:
        return band
    # Drawn within the lesion's box and the one pixel the band reaches past it.
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    band[box] = ndimage.binary_dilation(mask[box]) & ~ndimage.binary_erosion(mask[box])
    return band


def _wrapped(text: str, font, width: int) -> list:
    """`text`'s lines, each broken between words to fit `width` px in `font`."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines
