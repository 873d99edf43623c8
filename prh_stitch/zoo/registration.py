"""Registering the zoo's models, and a ``random:<name>`` control for every built-in, in the encoder registry."""

from __future__ import annotations

from typing import Any

from prh_stitch.encoders.base import FrozenEncoder
from prh_stitch.registry import Registry
from prh_stitch.zoo.entries import ZOO

RANDOM_PREFIX = "random:"


def build_zoo_encoder(name: str, **options: Any) -> FrozenEncoder:
    from prh_stitch.zoo.builders import BUILDERS
    from prh_stitch.zoo.store import require_fetched

    return BUILDERS[name](require_fetched(name), **options)


def build_random_control(registry: Registry, name: str, seed: int = 0, **options: Any) -> FrozenEncoder:
    """The built-in ``name`` with seeded random weights; its name (and so its fingerprint) says ``random:``."""
    from prh_stitch.encoders.random_weights import randomise_weights

    encoder = registry.get(name)(**options)
    randomise_weights(encoder, seed)
    encoder.name = f"{RANDOM_PREFIX}{name}" if seed == 0 else f"{RANDOM_PREFIX}{name}@seed{seed}"
    encoder._dims.clear()
    return encoder.freeze()


def register_zoo(registry: Registry) -> None:
    """Add the zoo's names, then ``random:<name>`` for every name the registry holds (call it last)."""
    for name in ZOO:
        registry.register(name)(lambda _name=name, **options: build_zoo_encoder(_name, **options))
    for name in registry.names():
        if not name.startswith(RANDOM_PREFIX):
            registry.register(f"{RANDOM_PREFIX}{name}")(
                lambda _name=name, **options: build_random_control(registry, _name, **options))
