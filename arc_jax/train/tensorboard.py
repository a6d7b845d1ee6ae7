"""TensorBoard (tensorboardX) scalars and ARC-palette task images, written by process 0 only."""

from __future__ import annotations

import glob
import os
import struct
from collections.abc import Mapping, Sequence

import jax
import numpy as np

# The ARC palette (colours 0..9), as in the ARC testing interface.
ARC_PALETTE = np.asarray([
    (0, 0, 0), (0, 116, 217), (255, 65, 54), (46, 204, 64), (255, 220, 0),
    (170, 170, 170), (240, 18, 190), (255, 133, 27), (127, 219, 255), (135, 12, 37),
], np.uint8)


class Writer:
    """Scalars and images into `workdir/tensorboard`; a no-op on processes other than 0."""

    def __init__(self, workdir: str):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(prefix + name, float(value), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """image: uint8 `[H, W, 3]`."""
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar in the event files of `logdir` (as `Writer` writes them): tag -> sorted
    [(step, wall_time, value)]; a step written twice (a resumed run) keeps its last value.
    A truncated last record (a run killed while writing) ends its file."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, tuple[float, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            if at + 16 + length > len(data):
                break
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = (
                        event.wall_time, value.simple_value)
    return {tag: [(step, *by_step[step]) for step in sorted(by_step)]
            for tag, by_step in scalars.items()}


def render_grid(grid: np.ndarray, cell: int = 8) -> np.ndarray:
    """A grid `[h, w]` of colours 0..9 → uint8 image `[h*cell, w*cell, 3]` with grey grid lines."""
    image = ARC_PALETTE[np.clip(np.asarray(grid), 0, 9)]
    image = image.repeat(cell, axis=0).repeat(cell, axis=1)
    image[::cell, :] = 64
    image[:, ::cell] = 64
    return image


def render_row(grids: Sequence[np.ndarray | None], cell: int = 8, gap: int = 8) -> np.ndarray:
    """Grids side by side (input, target, prediction), top-aligned on a white background; a
    missing grid (None: no valid prediction) is drawn as a red cross."""
    images = []
    for grid in grids:
        if grid is None:
            cross = np.full((3 * cell, 3 * cell, 3), 255, np.uint8)
            idx = np.arange(3 * cell)
            cross[idx, idx] = cross[idx, idx[::-1]] = (255, 0, 0)
            images.append(cross)
        else:
            images.append(render_grid(grid, cell))
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    out = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for im in images:
        out[: im.shape[0], x: x + im.shape[1]] = im
        x += im.shape[1] + gap
    return out
