"""Built-in raw-FFI calibration stages (2-D bias, pedestal, gain, linearity, smear, flat)."""
