"""prh_stitch: model stitching and representation alignment between frozen encoders."""

__version__ = "0.1.0"
