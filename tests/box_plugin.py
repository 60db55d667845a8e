"""A third-party-style plugin owning its settings section ``[box]``, registered in tests
through ``TESSPHOT_EXTRA_PLUGINS=box_plugin`` (tests/test_plugin_manager.py,
tests/test_testing.py).

Algorithm ``box``: the sum of a square box of pixels around the target minus the local sky
(the core's background-subtracted cube), errors from the pixel uncertainties.
"""
import numpy as np

from photometry import STATUS, BasePhotometry, at_least, between, hookimpl


class BoxPhotometry(BasePhotometry):
    name = "box"
    version = "0.1.0"

    def do_photometry(self):
        cfg = self.settings["box"]
        half = int(cfg["half_width"])
        r1, _, c1, _ = self.stamp
        r0, c0 = int(round(self.target_pos_row)) - r1, int(round(self.target_pos_column)) - c1
        mask = np.zeros(self.sumimage.shape, dtype=bool)
        mask[max(r0 - half, 0):r0 + half + 1, max(c0 - half, 0):c0 + half + 1] = True
        if mask.sum() < cfg["min_pixels"]:
            self.report_details(error=f"box of {mask.sum()} pixels < box.min_pixels")
            return STATUS.WARNING
        images, err = self.images_cube[:, mask], self.images_err_cube[:, mask]
        self.lightcurve["flux"] = np.sum(images, axis=1)
        self.lightcurve["flux_err"] = np.sqrt(np.sum(err ** 2, axis=1))
        self.lightcurve["flux_background"] = np.sum(self.backgrounds_cube[:, mask], axis=1)
        self.lightcurve["pos_centroid"] = np.tile(
            [self.target_pos_column, self.target_pos_row], (self.n_frames, 1))
        self.final_phot_mask = mask
        return STATUS.OK


@hookimpl
def register_algorithms():
    return [BoxPhotometry]


@hookimpl
def register_settings():
    return {"box": {"half_width": 2, "min_pixels": 4}}


@hookimpl
def register_setting_limits():
    return {"box.half_width": at_least(1), "box.min_pixels": between(1, 10000)}
