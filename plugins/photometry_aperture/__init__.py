"""Built-in aperture photometry plugin (masks from the sum image, catalog and PRF)."""
