"""Where a target's stars are in each frame: the data source's movement kernel applied to
catalog positions, frame lookup by index or time, the target's position jitter (POS_CORR)."""
import numpy as np

__all__ = ["frame_index", "source_frame", "movement_at", "catalog_attime", "pos_corr",
           "kernel_shift"]


def frame_index(phot, frame_or_time):
    """Index into this object's frames of an integer frame index or a float time."""
    if isinstance(frame_or_time, (int, np.integer)):
        index = int(frame_or_time)
        if not -phot.n_frames <= index < phot.n_frames:
            raise IndexError(f"frame {index} out of range (0..{phot.n_frames - 1})")
        return index % phot.n_frames
    t = float(frame_or_time)
    index = int(np.argmin(np.abs(phot.time - t)))
    step = np.median(np.diff(phot.time)) if phot.n_frames > 1 else np.inf
    if abs(phot.time[index] - t) > step:
        raise ValueError(f"time {t} is outside the time series "
                         f"({phot.time[0]:.5f}..{phot.time[-1]:.5f})")
    return index


def source_frame(phot, index):
    """Frame index in the source of frame ``index`` of this object."""
    if isinstance(phot._frames, slice):
        return int(index)
    return int(phot._frames[index])


def movement_at(phot, rows, columns, frame_index):
    """(drow, dcolumn) shift of CCD positions ``rows, columns`` in frame ``frame_index``."""
    rows = np.asarray(rows, dtype=float)
    columns = np.asarray(columns, dtype=float)
    kernel = phot.movement_kernel
    if kernel is None:
        return np.zeros_like(rows), np.zeros_like(columns)
    dx, dy = kernel_shift(kernel, columns - phot.column_offset, rows - phot.row_offset,
                           source_frame(phot, frame_index))
    return dy, dx


def catalog_attime(phot, frame_or_time):
    """The catalog with ``row, column, row_stamp, column_stamp`` moved to that frame.

    ``frame_or_time`` is an integer frame index or a float BTJD time (nearest frame).
    """
    index = frame_index(phot, frame_or_time)
    cat = phot.catalog.copy()
    drow, dcol = movement_at(phot, cat["row"], cat["column"], index)
    for key, delta in (("row", drow), ("row_stamp", drow), ("column", dcol),
                       ("column_stamp", dcol)):
        cat[key] = np.asarray(cat[key]) + delta
    return cat


def pos_corr(phot):
    """(N, 2) column/row jitter of the target relative to the reference frame (pixels)."""
    pos = getattr(phot.source, "pos_corr", None)
    if pos is not None:
        return np.asarray(pos, dtype=float)[phot._frames]
    out = np.zeros((phot.n_frames, 2))
    if phot.movement_kernel is None:
        return out
    frames = np.arange(len(phot.source.time))[phot._frames]
    dx, dy = kernel_shift(phot.movement_kernel,
                           np.atleast_1d(phot.target_pos_column - phot.column_offset),
                           np.atleast_1d(phot.target_pos_row - phot.row_offset), frames)
    out[:, 0] = np.reshape(dx, (phot.n_frames, -1))[:, 0]
    out[:, 1] = np.reshape(dy, (phot.n_frames, -1))[:, 0]
    return out


def kernel_shift(kernel, x, y, frames):
    """Shift (dx, dy) in ``frames`` of reference science-pixel positions (x, y).

    ``kernel`` has ``shift(x, y, frame_index)`` (:class:`photometry.data.movement.MovementKernel`,
    :class:`photometry.data.tpf.TranslationKernel`). Frames without a measurement (NaN kernel rows)
    get no shift rather than NaN positions: the reference position is the best guess there.
    """
    dx, dy = kernel.shift(x, y, frames)
    dx = np.where(np.isfinite(dx), dx, 0.0)
    dy = np.where(np.isfinite(dy), dy, 0.0)
    return dx, dy
