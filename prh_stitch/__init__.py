"""prh_stitch: model stitching and representation alignment between frozen encoders.

A notebook session::

    import prh_stitch
    result = prh_stitch.align({"vision": ["tiny_vit"], "text": ["tiny_bert"]}, "shards/val-*.tar", k=5)
    result.table                                   # long form: one row per model pair, metric and layer choice
    stitcher = prh_stitch.load_stitcher("runs/tiny/.../checkpoints/stitcher")  # a folder, a .ckpt or a Hub id
    report = prh_stitch.evaluate_stitcher("shards/val-*.tar", ckpt="runs/tiny/.../last.ckpt").report
    summary = prh_stitch.run_study("study_offline")  # a YAML path, a shipped name or a dict

The names below are imported on first use, so ``import prh_stitch`` stays light.
"""

__version__ = "0.1.0"

_API = {
    "align": ("prh_stitch.alignment", "align"),
    "run_study": ("prh_stitch.alignment", "run_study"),
    "evaluate_stitcher": ("prh_stitch.evaluation", "evaluate_stitcher"),
    "load_stitcher": ("prh_stitch.checkpoint", "load_stitcher"),
    "HubStitcher": ("prh_stitch.model_folder", "HubStitcher"),
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module 'prh_stitch' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))


__all__ = ["HubStitcher", "__version__", "align", "evaluate_stitcher", "load_stitcher", "run_study"]
