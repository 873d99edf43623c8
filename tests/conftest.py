"""Test-wide settings: no network, a private cache, quiet logs."""

import os

# Set before transformers / huggingface_hub are imported anywhere: nothing in the tests may reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Scenes and features written by the tests go to one temporary cache for the whole session."""
    cache = tmp_path_factory.mktemp("prh_cache")
    previous = os.environ.get("PRH_STITCH_CACHE")
    os.environ["PRH_STITCH_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("PRH_STITCH_CACHE", None)
    else:
        os.environ["PRH_STITCH_CACHE"] = previous
