"""prh_stitch: model stitching and representation alignment between frozen encoders."""

__version__ = "0.1.0"


def load_stitcher(path, map_location="cpu"):
    """Load a trained stitcher from a checkpoint (see :func:`prh_stitch.checkpoint.load_stitcher`)."""
    from prh_stitch.checkpoint import load_stitcher as _load

    return _load(path, map_location)


__all__ = ["__version__", "load_stitcher"]
