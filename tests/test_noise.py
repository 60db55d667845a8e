"""CCD noise model against the real SPOC FFI's own uncertainty image and header."""
from pathlib import Path

import numpy as np
from astropy.io import fits

from photometry.noise import CCDNoise, output_of_column

REAL = Path(__file__).parent / "data" / "tess2018206192942-s0001-1-4-0120-s_ffic.fits"


def test_real_ffi_header_values():
    with fits.open(REAL) as hdul:
        header = dict(hdul[0].header) | dict(hdul[1].header)
    noise = CCDNoise.from_header(header, 1800.0)
    assert noise.defaulted == ()
    assert noise.read_noise == (10.057999610900879, 7.464599609375, 7.307999610900879,
                                9.168599128723145)
    assert noise.n_readouts == 720
    assert abs(noise.exposure - 0.016499994018 * 86400) < 1e-9
    assert noise.output_starts == (44, 556, 1068, 1580)
    assert list(output_of_column([0, 44, 555, 556, 1579, 1580, 2135])) == [0, 0, 0, 1, 2, 3, 3]
    assert CCDNoise.from_attrs(noise.to_attrs()) == noise


def test_model_matches_spoc_uncertainty_within_10_percent():
    """SPOC's uncert image (where it covers the science pixels: CCD columns 44-127, output A)."""
    with fits.open(REAL) as hdul:
        header = dict(hdul[0].header) | dict(hdul[1].header)
        image = hdul[1].data[:, 44:128].astype(float)
        uncert = hdul[2].data[:, 44:128].astype(float)
    noise = CCDNoise.from_header(header, 1800.0)
    model = np.sqrt(noise.pixel_variance(image, np.arange(44, 128)[None, :]))
    ratio = uncert / model
    assert 1.0 < np.nanmedian(ratio) < 1.10      # measured 1.035 (1.026-1.045): SPOC adds flat-field terms
    assert np.nanpercentile(ratio, 99) < 1.12


def test_defaults_without_keywords():
    noise = CCDNoise.from_header({}, 1800.0)
    assert set(noise.defaulted) == {"READNOIA", "READNOIB", "READNOIC", "READNOID",
                                    "NREADOUT", "EXPOSURE"}
    assert noise.n_readouts == 720 and abs(noise.exposure - 1425.6) < 1e-9
    fast = CCDNoise.from_header({}, 20.0)        # 20-s data: no cosmic-ray mitigation
    assert fast.n_readouts == 10 and abs(fast.exposure - 19.8) < 1e-9
    # read-noise-only pixel: sqrt(720) * 10 e- / 1425.6 s
    assert abs(np.sqrt(noise.pixel_variance(np.array([-5.0]), 100))[0]
               - np.sqrt(720) * 10 / 1425.6) < 1e-12
