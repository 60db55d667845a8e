"""Built-in backdrop background model: per-frame CCD-wide linear background fit at prepare."""
