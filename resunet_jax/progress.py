"""Progress of long loops (patients in eval, cv and predict): a bar with an ETA on a
terminal, plain periodic log lines otherwise.

    for source in progress.track(sources, "predict", unit="patients"):
        ...

On a terminal (stderr is a TTY) the bar is tqdm's; in a log file, a batch job or a
notebook's captured output, one absl INFO line at the start, then at most one every
`every_s` seconds, and one at the end, so a log shows how far a run got and when it
will finish without a line per item.
"""

import sys
import time

import tqdm
from absl import logging


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def line(what: str, done: int, total: int, elapsed: float, unit: str) -> str:
    """One progress line, e.g. "predict: 3/20 patients (15%), 0:00:41 elapsed, ETA 0:03:52"."""
    text = f"{what}: {done}/{total} {unit} ({100 * done // max(total, 1)}%), "
    text += f"{_clock(elapsed)} elapsed"
    if 0 < done < total:
        text += f", ETA {_clock(elapsed / done * (total - done))}"
    return text


def track(items, what: str, unit: str = "items", total: int | None = None, every_s: float = 30.0):
    """Yields `items`, showing how many are done.

    Args:
        items: an iterable (`len` gives the total unless `total` is given).
        what: the loop's name in the bar or the lines ("predict", "eval").
        unit: what an item is ("patients", "slices").
        total: the number of items, if `items` has no length.
        every_s: seconds between log lines when stderr is not a terminal.

    Yields:
        The items of `items`, in order.
    """
    total = len(items) if total is None else total
    if sys.stderr.isatty():
        yield from tqdm.tqdm(items, desc=what, unit=f" {unit}", total=total)
        return
    start = last = time.monotonic()
    logging.info("%s", line(what, 0, total, 0.0, unit))
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or done == total:
            logging.info("%s", line(what, done, total, now - start, unit))
            last = now
