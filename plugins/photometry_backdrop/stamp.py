"""Evaluating the backdrop model on one stamp: read only what the stamp needs.

Why: a target's stamp (15 x 15 px) sees a handful of the model's 1166 terms (the polynomial
ones and the 3 x 3 to 4 x 4 splines whose support covers it) and its own ~15 columns of
strap offsets, and its error is ``noise[t]`` times a static per-pixel factor. Reading the
whole ``weights`` (N x 1166) and ``strap`` (N x 2048) and solving against the 1166 x 1166
Cholesky factor for every target cost 27 ms + 24 ms per target at 1 282 frames (100 ms and
300 MB at 11 800). :func:`write_stamp_tables` stores three derived datasets at prepare time
(group ``stamp_tables``, checksummed like the rest):

=================== ============ ==============================================================
``weights_by_term`` (n_terms, N) ``weights`` transposed: one term's series is one read
``strap_by_column`` (C, N)       ``strap`` transposed: a stamp's columns are a few reads
``error_scale``     (R, C) f8    ``sqrt(phi^T A^-1 phi) * gain``: ``evaluate_error`` is
                                 ``noise[t] * error_scale`` (the statistical error of a
                                 frame's fit scales with that frame's noise only)
=================== ============ ==============================================================

A cache written before these tables (or with a frame count they do not match) is evaluated
from the full datasets, once per process (:class:`StampEvaluator` keeps them): same numbers,
slower first call. Both give what the model's formula gives for the whole frame, to
floating-point rounding (tests compare with the dense formula).
"""
import collections
import os
import threading

import numpy as np
from scipy import linalg

from .basis import Axis

__all__ = ["StampEvaluator", "write_stamp_tables", "error_scale"]

#: subgroup of ``models/backdrop`` holding the derived datasets
TABLES = "stamp_tables"
#: about this many bytes per chunk of the transposed series (one row per chunk at N >= 4096)
_CHUNK_BYTES = 16384


def _axes(group):
    a = group.attrs
    rows = Axis.from_attrs(a["n_rows"], a["poly_degree"], group["row_knots"][()])
    cols = Axis.from_attrs(a["n_cols"], a["poly_degree"], group["col_knots"][()])
    return rows, cols


def error_scale(group):
    """(R, C) ``sqrt(phi^T A^-1 phi) * gain`` of every pixel (unit noise), from the stored
    Cholesky factor, strap coupling and precision.

    ``phi = a - k_c`` with ``a`` the pixel's (sparse) term values and ``k_c`` its column's
    strap coupling, so ``phi^T M phi = a^T M a - 2 a^T (M k_c) + k_c^T M k_c`` with
    ``M = A^-1``: the dense parts are once per column, the rest per pixel over the ~19 terms
    that are non-zero there (pixels grouped by the knot intervals they share). Whole CCD:
    ~2 s instead of ~1 000 s for one triangular solve per pixel.
    """
    rows_ax, cols_ax = _axes(group)
    R, C = int(group.attrs["n_rows"]), int(group.attrs["n_cols"])
    pairs = group["pairs"][()]
    L = group["cov_chol"][()].astype(np.float64)
    coup = group["strap_coupling"][()].astype(np.float64)          # (C, n)
    prec = np.asarray(group["strap_precision"][()], dtype=np.float64)
    gain = np.asarray(group["gain"][()], dtype=np.float64)
    n = L.shape[0]
    linv = linalg.solve_triangular(L, np.eye(n), lower=True, check_finite=False)
    h = linv @ coup.T                                                # (n, C): L^-1 k_c
    g = linv.T @ h                                                   # (n, C): M k_c
    kk = np.einsum("nc,nc->c", h, h)                                 # k_c^T M k_c
    m = linv.T @ linv                                                # M
    rb = rows_ax.basis(np.arange(R))
    cb = cols_ax.basis(np.arange(C))
    var = np.empty((R, C))
    for rsel, ar in _runs(rb != 0):
        for csel, ac in _runs(cb != 0):
            terms = np.flatnonzero(ar[pairs[:, 0]] & ac[pairs[:, 1]])
            a = (rb[rsel][:, None, pairs[terms, 0]] * cb[csel][None, :, pairs[terms, 1]])
            quad = np.einsum("rck,kj,rcj->rc", a, m[np.ix_(terms, terms)], a, optimize=True)
            cross = np.einsum("rck,kc->rc", a, g[terms][:, csel])
            var[rsel, csel] = quad - 2.0 * cross + kk[None, csel]
    var += 1.0 / prec[None, :]
    return np.sqrt(np.maximum(var, 0.0)) * gain[None, :]


def _runs(active):
    """(slice, pattern) of consecutive rows of ``active`` (pixels x basis functions) whose
    set of non-zero basis functions is the same."""
    key = np.packbits(active, axis=1)
    change = np.flatnonzero(np.any(key[1:] != key[:-1], axis=1)) + 1
    bounds = np.r_[0, change, len(active)]
    return [(slice(int(a), int(b)), active[a]) for a, b in zip(bounds[:-1], bounds[1:])]


def write_stamp_tables(group):
    """Write the derived datasets of :mod:`.stamp` into ``group[TABLES]`` (replacing them).

    Called once at the end of the prepare stage; needs ``weights``, ``strap``, ``noise``,
    ``pairs``, the knots, ``gain``, ``cov_chol``, ``strap_coupling`` and
    ``strap_precision``. Costs a few seconds for a full CCD, and 4 (n_terms + C) N + 8 R C
    bytes (a 2 % addition to a full-frame cache of 1 282 frames).
    """
    if TABLES in group:
        del group[TABLES]
    t = group.create_group(TABLES)
    weights = group["weights"][()]
    strap = group["strap"][()]
    n_frames = weights.shape[0]
    if n_frames:
        for name, data in (("weights_by_term", weights.T), ("strap_by_column", strap.T)):
            per = max(1, min(data.shape[0], _CHUNK_BYTES // (4 * n_frames)))
            t.create_dataset(name, data=np.ascontiguousarray(data), chunks=(per, n_frames),
                             fletcher32=True)
    scale = error_scale(group)
    t.create_dataset("error_scale", data=scale, chunks=tuple(min(64, s) for s in scale.shape),
                     fletcher32=True)
    t.attrs["n_frames"] = n_frames
    t.attrs["complete"] = True
    return t


def _frame_index(frames, n):
    """Sorted unique indices to read, and how to put the rows back in the order asked."""
    from photometry import InputError
    if isinstance(frames, slice):
        idx = np.arange(n)[frames]
    else:
        idx = np.asarray(frames, dtype=np.int64).ravel()
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise InputError(f"backdrop: frame index out of range 0..{n - 1}")
        idx = np.where(idx < 0, idx + n, idx)
    uniq, inverse = np.unique(idx, return_inverse=True)
    return uniq, inverse


def _indices(sel, n):
    return np.arange(n)[sel] if isinstance(sel, slice) else np.asarray(sel, dtype=np.int64)


def _read_rows(ds, rows):
    """``ds[rows]`` for sorted unique ``rows``: one slice per run of consecutive rows."""
    if len(rows) == 0:
        return np.zeros((0,) + ds.shape[1:], dtype=ds.dtype)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    parts = [ds[int(r[0]):int(r[-1]) + 1] for r in np.split(rows, breaks)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class StampEvaluator:
    """The static part of one cache's backdrop model, kept per process (:meth:`of`).

    ``evaluate`` / ``evaluate_error`` read only the stamp's terms, columns and pixels from
    the ``stamp_tables`` of the group they are given; without them the full datasets are
    read once here and kept.
    """

    _cache = collections.OrderedDict()
    _lock = threading.Lock()
    KEEP = 4

    def __init__(self, group):
        self.rows_ax, self.cols_ax = _axes(group)
        self.shape = (int(group.attrs["n_rows"]), int(group.attrs["n_cols"]))
        self.pairs = group["pairs"][()]
        self.gain = np.asarray(group["gain"][()], dtype=np.float64)
        self.noise = np.asarray(group["noise"][()], dtype=np.float64)
        self.n_frames = len(self.noise)
        t = group.get(TABLES)
        self.tables = t is not None and bool(t.attrs.get("complete", False)) \
            and int(t.attrs["n_frames"]) == self.n_frames
        self._memory = None

    @classmethod
    def of(cls, group):
        """The evaluator of ``group`` (built on first use; keyed by file, path and mtime)."""
        filename = group.file.filename
        try:
            st = os.stat(filename)
            key = (os.path.realpath(filename), group.name, st.st_mtime_ns, st.st_size)
        except OSError:
            key = (filename, group.name, id(group.file))
        with cls._lock:
            ev = cls._cache.get(key)
            if ev is None:
                ev = cls._cache[key] = cls(group)
                while len(cls._cache) > cls.KEEP:
                    cls._cache.popitem(last=False)
            cls._cache.move_to_end(key)
        return ev

    def _full(self, group):
        """Without tables: the transposed series and the error scale, read once."""
        if self._memory is None:
            self._memory = {"weights_by_term": np.ascontiguousarray(group["weights"][()].T),
                            "strap_by_column": np.ascontiguousarray(group["strap"][()].T),
                            "error_scale": error_scale(group)}
        return self._memory

    def _source(self, group, name):
        return group[TABLES][name] if self.tables else self._full(group)[name]

    def evaluate(self, group, row_sel, col_sel, frames=slice(None)):
        """(n_frames, rows, cols) background in e-/s (see ``Backdrop.evaluate``)."""
        rows = _indices(row_sel, self.shape[0])
        cols = _indices(col_sel, self.shape[1])
        uniq, inverse = _frame_index(frames, self.n_frames)
        rb = self.rows_ax.basis(rows)
        cb = self.cols_ax.basis(cols)
        ar = np.flatnonzero(np.any(rb != 0, axis=0))
        ac = np.flatnonzero(np.any(cb != 0, axis=0))
        p0, p1 = self.pairs[:, 0], self.pairs[:, 1]
        terms = np.flatnonzero(np.isin(p0, ar) & np.isin(p1, ac))
        w = _read_rows(self._source(group, "weights_by_term"), terms).astype(np.float64)
        ucols, cinv = np.unique(cols, return_inverse=True)
        strap = _read_rows(self._source(group, "strap_by_column"), ucols).astype(np.float64)
        if uniq.size != self.n_frames:
            w, strap = w[:, uniq], strap[:, uniq]
        n = uniq.size
        # weights of the stamp's terms as (frames, active row functions, active column ones)
        wm = np.zeros((n, ar.size, ac.size))
        wm[:, np.searchsorted(ar, p0[terms]), np.searchsorted(ac, p1[terms])] = w.T
        # R @ W @ C.T for every frame as two plain matrix products
        x = (wm.reshape(n * ar.size, ac.size) @ cb[:, ac].T).reshape(n, ar.size, len(cols))
        out = (rb[:, ar] @ x.transpose(1, 0, 2).reshape(ar.size, -1)).reshape(
            len(rows), n, len(cols))
        # strap and gain in place, in the (rows, frames, cols) order the product came in
        # (the same two operations per value as on the transposed cube, without its strided
        # temporaries); then one copy into the (frames, rows, cols) layout
        out += strap.T[None, :, cinv]
        out *= self.gain[cols][None, None, :]
        out = np.ascontiguousarray(out.transpose(1, 0, 2))
        if uniq.size == inverse.size and np.array_equal(inverse, np.arange(inverse.size)):
            return out
        return out[inverse]

    def evaluate_error(self, group, row_sel, col_sel, frames=slice(None)):
        """(n_frames, rows, cols) 1-sigma error of :meth:`evaluate`."""
        rows = _indices(row_sel, self.shape[0])
        cols = _indices(col_sel, self.shape[1])
        uniq, inverse = _frame_index(frames, self.n_frames)
        src = self._source(group, "error_scale")
        if len(rows) and len(cols):
            r0, c0 = int(rows.min()), int(cols.min())
            block = np.asarray(src[r0:int(rows.max()) + 1, c0:int(cols.max()) + 1])
            scale = block[np.ix_(rows - r0, cols - c0)]
        else:
            scale = np.zeros((len(rows), len(cols)))
        return self.noise[uniq][inverse][:, None, None] * scale[None]
