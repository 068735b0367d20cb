"""The HTML page of a predict or eval run: one row per patient with its preview picture
and figures, in `predict/index.html` or `eval/index.html`.

The page is one file with its styles inline and no scripts; its pictures and the
files it links to are the run's own, by paths relative to the page, so the folder can
be moved, copied or served as it is.
"""

import html
import os

from resunet_jax.workdir import atomic_write

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ccc; padding: 0.4em 0.6em; text-align: left;
         vertical-align: top; font-size: 0.9em; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.preview img { max-width: 60em; height: auto; }
tbody.review td { background: #fff4e0; }
.error { color: #b00; }
"""
# (column title, row key) per kind; a key missing from every row drops its column.
COLUMNS = {
    "predict": (
        ("patient", "patient"),
        ("tumour", "tumor"),
        ("slices with tumour", "slices_with_tumor"),
        ("lesion volume", "lesion_volume"),
        ("uncertainty", "uncertainty"),
        ("review", "review"),
        ("notes", "notes"),
    ),
    "eval": (
        ("patient", "patient_id"),
        ("Dice", "dice"),
        ("reference area (px)", "true_area"),
        ("predicted area (px)", "pred_area"),
        ("uncertainty", "uncertainty"),
        ("review", "review"),
    ),
}
LINKED_FILES = (
    ("mask", "mask_file"),
    ("probabilities", "probability_file"),
    ("uncertainty", "uncertainty_file"),
)


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None or value == "":
        return ""
    if key == "lesion_volume":
        return html.escape(f"{value} {row.get('lesion_volume_unit', '')}".strip())
    if isinstance(value, float):
        return f"{value:.3f}" if key != "uncertainty" else f"{value:.4f}"
    return html.escape(str(value))


def write_index(out_dir: str, rows: list[dict], kind: str, title: str, summary: str = ""):
    """Writes `out_dir/index.html`: a table, one row per patient.

    Args:
        out_dir: the run's output folder (predict/ or eval/); paths in `rows` under it
            are linked relative to it.
        rows: the patients' rows (patients.csv / per_patient.csv fields), each with an
            optional "preview_file" (PNG path) and "error".
        kind: "predict" or "eval" (`COLUMNS`).
        title: the page's heading.
        summary: one line under the heading (e.g. the mean Dice).
    """

    # A column none of the rows has is dropped, as is an uncertainty of 0 everywhere (one
    # model without flips has none to give).
    def has_values(key):
        values = [r.get(key) for r in rows]
        if key == "uncertainty":
            return any(isinstance(v, float) and v > 0 for v in values)
        return any(v not in (None, "") for v in values)

    columns = [(t, k) for t, k in COLUMNS[kind] if has_values(k)]

    def rel(path):
        return html.escape(os.path.relpath(path, out_dir))

    head = "".join(f"<th>{html.escape(t)}</th>" for t, _ in columns)
    body = []
    for row in rows:
        cells = "".join(f"<td>{_cell(row, k)}</td>" for _, k in columns)
        links = " ".join(
            f'<a href="{rel(row[k])}">{name}</a>' for name, k in LINKED_FILES if row.get(k)
        )
        if row.get("error"):
            links += f' <span class="error">{html.escape(row["error"])}</span>'
        preview = row.get("preview_file")
        picture = (
            f'<img src="{rel(preview)}" alt="preview of {_cell(row, columns[0][1])}">'
            if preview
            else ""
        )
        flagged = " review" if row.get("review") in (True, "True") else ""
        body.append(  # one tbody per patient: its figures, then its preview
            f'<tbody class="patient{flagged}"><tr>{cells}<td>{links}</td></tr>\n'
            f'<tr><td class="preview" colspan="{len(columns) + 1}">{picture}</td></tr></tbody>'
        )
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(summary)}</p>\n"
        f"<table>\n<thead><tr>{head}<th>files</th></tr></thead>\n"
        + "\n".join(body)
        + "\n</table>\n</body></html>\n"
    )
    with atomic_write(os.path.join(out_dir, "index.html")) as f:
        f.write(page)
