"""The score cache: per-pair scores on disk, keyed on the features' content and every setting that changes them.

The key holds both sides' encoder and data fingerprints and the content digests of their feature store entries
(``FeatureSet.info["content_sha256"]``, a digest of the entry's recorded file hashes), so a score is never
returned for features other than those it was computed from, a re-extracted entry included. Each record is stored
with a SHA-256 of its own content; one that does not verify (edited, cut) is recomputed, not reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

from prh_stitch import reports
from prh_stitch.alignment.features import encoder_record
from prh_stitch.alignment.settings import ScoreSettings
from prh_stitch.last_used import mark_used

log = logging.getLogger("prh_stitch.alignment")

SCORE_CACHE_FORMAT = 3  # 2: feature content digests in the key, a checksum in each record; 3: half-sample intervals


def _checksum(record: Any) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class ScoreCache:
    """Per-pair scores on disk (``root/KEY.json``), each record checked against its own checksum on reading."""

    def __init__(self, root: Optional[Path]) -> None:
        self.root = root

    def key(self, payload: Dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        if self.root is None:
            return None
        path = self.root / f"{key}.json"
        try:
            stored = json.loads(path.read_text())
            record, checksum = stored["record"], stored["sha256"]
        except (FileNotFoundError, KeyError):
            return None  # not cached, or cached by an older version without checksums
        except (OSError, ValueError, TypeError) as exc:
            log.warning("score cache record %s cannot be read (%s); computing it again", path, exc)
            return None
        if _checksum(record) != checksum:
            log.warning("score cache record %s does not match its checksum; computing it again", path)
            return None
        mark_used(path)
        return record

    def put(self, key: str, record: Dict[str, Any]) -> None:
        if self.root is not None:
            record = reports.to_jsonable(record)  # what reading it back gives, so the checksum verifies
            reports.write_json(self.root / f"{key}.json", {"record": record, "sha256": _checksum(record)})


def score_key(cache: ScoreCache, fa, fb, metric: str, opts: Dict[str, Any], settings: ScoreSettings) -> str:
    key_settings = asdict(settings) | {"metrics": None}
    if settings.outlier_quantile in (None, 1.0):
        # No clamp (1 clamps nothing): the key is the one written before the option existed, so those scores stay
        # valid; with a clamp the quantile is part of the key and an unclamped score is never returned for it.
        del key_settings["outlier_quantile"]
    return cache.key({"format": SCORE_CACHE_FORMAT, "a": encoder_record(fa), "b": encoder_record(fb),
                      "content_a": (fa.info or {}).get("content_sha256"),
                      "content_b": (fb.info or {}).get("content_sha256"),
                      "metric": metric, "opts": opts, "settings": key_settings})
