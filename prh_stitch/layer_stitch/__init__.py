"""Layer-to-layer stitching: run network A up to layer i, a stitching layer, then network B from layer j.

The classic test of whether two networks represent alike (Lenc & Vedaldi 2015; Bansal et al. 2021): if a cheap
stitching layer can carry A's layer-i activations into B's layer j with little loss, the two representations differ
by little more than that layer. One concept per module:

- :mod:`.surgery` — ``run_until`` (timm's ``forward_intermediates``) and ``run_from`` (the rest of the network);
- :mod:`.stitch_layer` — :class:`StitchLayer` (1×1 conv + BatchNorm for maps, linear for tokens and vectors) and
  its least-squares initialisation;
- :mod:`.cache` — the frozen networks' outputs on disk (atomic, identity- and checksum-verified);
- :mod:`.data` — :class:`LayerStitchDataModule` (images with labels, and those cached outputs);
- :mod:`.probe` — the linear probe of ``target: labels``;
- :mod:`.lightning` — :class:`LayerStitchingModule`, what ``train.py --config configs/layer_stitch_*.yaml`` trains;
- :mod:`.sweep` — :func:`layer_sweep`, every (i, j) of two layer lists: the penalty matrix and its report.
"""

from prh_stitch.lazy import lazy_exports

# Loaded on first use: the command lines read layer_sweep's signature without importing Lightning.
__getattr__ = lazy_exports(__name__, {
    "LayerStitchDataModule": "data", "LayerStitchingModule": "lightning", "fit_probe": "probe",
    "StitchLayer": "stitch_layer", "run_from": "surgery", "run_until": "surgery", "SweepReport": "sweep",
    "layer_sweep": "sweep", "write_sweep_report": "sweep"})

__all__ = ["LayerStitchDataModule", "LayerStitchingModule", "StitchLayer", "SweepReport", "fit_probe",
           "layer_sweep", "run_from", "run_until", "write_sweep_report"]
