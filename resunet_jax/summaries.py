"""TensorBoard summaries without TensorFlow (flax's writer imports it): tensorboard's
own event-file writer, so a run logs the same curves on machines without TF."""

import io

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from resunet_jax import visualize


class SummaryWriter:
    """Writes scalars and images to an event file under `logdir`.

    Args:
        logdir: the run's TensorBoard folder (created if needed).
    """

    def __init__(self, logdir: str):
        self._writer = EventFileWriter(logdir)

    def _write(self, value: summary_pb2.Summary.Value, step: int):
        summary = summary_pb2.Summary(value=[value])
        self._writer.add_event(event_pb2.Event(step=int(step), summary=summary))

    def scalar(self, tag: str, value: float, step: int):
        self._write(summary_pb2.Summary.Value(tag=tag, simple_value=float(value)), step)

    def image(self, tag: str, image: np.ndarray, step: int):
        """Logs an [H, W, 3] uint8 image (PNG-encoded)."""
        png = io.BytesIO()
        visualize.save_png(image, png)
        encoded = summary_pb2.Summary.Image(
            height=image.shape[0],
            width=image.shape[1],
            colorspace=3,
            encoded_image_string=png.getvalue(),
        )
        self._write(summary_pb2.Summary.Value(tag=tag, image=encoded), step)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()
