"""A small seeded synthetic scene with a known background, for tests and benchmarks.

The project simulator (``tessphot simulate``) writes complete sectors; this generator makes
only what the background fit needs (images, errors, sum image, star list, true background)
in memory, so unit tests run in seconds.
"""
import numpy as np

__all__ = ["make_scene"]


def _prf(dr, dc, sigma=0.9, wing=0.03, wing_scale=3.0):
    """Normalised Gaussian core plus a broad Moffat-like wing, as fraction per pixel."""
    r2 = dr ** 2 + dc ** 2
    core = np.exp(-0.5 * r2 / sigma ** 2) / (2 * np.pi * sigma ** 2)
    wings = (1 + r2 / wing_scale ** 2) ** -2.5 * (1.5 / (np.pi * wing_scale ** 2))
    return (1 - wing) * core + wing * wings


def make_scene(n_frames=20, shape=(128, 128), seed=1, sky=100.0, glow_peak=300.0,
               n_stars=None, cadence=1800.0, read_noise=10.0, n_bright=3, straps=True):
    """Frames with a smooth gradient, a moving time-varying glow, strap columns and stars.

    Returns
    -------
    dict with ``images``, ``errors`` (n_frames, R, C) float32, ``background`` (true, float64),
    ``sumimage``, ``stars`` (row, col, tmag arrays), ``time``.
    """
    rng = np.random.default_rng(seed)
    R, C = shape
    rr, cc = np.mgrid[0:R, 0:C].astype(float)
    u, v = rr / R - 0.5, cc / C - 0.5
    static = sky * (1 + 0.15 * u - 0.1 * v + 0.08 * u * v + 0.05 * u ** 2)
    time = np.arange(n_frames) * cadence / 86400.0
    phase = np.linspace(0, 1, n_frames)
    bg = np.empty((n_frames, R, C))
    strap_cols = np.arange(5, C, 37) if straps else np.array([], dtype=int)
    strap_amp = np.zeros(C)
    strap_amp[strap_cols] = rng.uniform(0.03, 0.08, len(strap_cols))
    for i, p in enumerate(phase):
        amp = glow_peak * np.exp(-0.5 * ((p - 0.6) / 0.25) ** 2)
        r0, c0 = R * (1.1 - 0.3 * p), C * (0.9 + 0.2 * p)
        glow = amp * np.exp(-np.hypot(rr - r0, cc - c0) / (0.45 * max(R, C)))
        level = static * (1 + 0.02 * np.sin(2 * np.pi * 3 * p)) + glow
        bg[i] = level * (1 + strap_amp[None, :])
    if n_stars is None:
        n_stars = int(0.02 * R * C)
    srow = rng.uniform(-5, R + 5, n_stars)
    scol = rng.uniform(-5, C + 5, n_stars)
    tmag = 16 - rng.exponential(1.5, n_stars)
    bright = rng.choice(n_stars, size=min(n_bright, n_stars), replace=False)
    tmag[bright] = rng.uniform(7.5, 9.0, len(bright))
    srow[bright] = rng.uniform(0.2 * R, 0.8 * R, len(bright))
    scol[bright] = rng.uniform(0.2 * C, 0.8 * C, len(bright))
    tmag = np.clip(tmag, 7.0, 16.5)
    flux = 15000.0 * 10 ** (-0.4 * (tmag - 10.0))
    stars = np.zeros((R, C))
    for r0, c0, f in zip(srow, scol, flux):
        rad = int(np.clip(4 + 6 * np.log10(max(f, 1) / 1000.0), 4, 40))
        r1, r2 = max(0, int(r0) - rad), min(R, int(r0) + rad + 1)
        c1, c2 = max(0, int(c0) - rad), min(C, int(c0) + rad + 1)
        if r1 >= r2 or c1 >= c2:
            continue
        stars[r1:r2, c1:c2] += f * _prf(rr[r1:r2, c1:c2] - r0, cc[r1:r2, c1:c2] - c0)
    signal = bg + stars[None]
    var = (signal * cadence + read_noise ** 2 * cadence / 2.0) / cadence ** 2
    err = np.sqrt(var)
    images = signal + rng.standard_normal(signal.shape) * err
    return {
        "images": images.astype(np.float32),
        "errors": err.astype(np.float32),
        "background": bg,
        "sumimage": images.mean(axis=0),
        "stars": (srow, scol, tmag),
        "time": time,
    }
