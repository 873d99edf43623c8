"""Converters: distribution files of one zoo model (unpacked) -> a folder with ``model.safetensors``.

Each converter is ``convert(sources, out, options) -> dict``: ``sources`` is the folder the model's wheels were
unpacked into, ``out`` an empty folder to fill, ``options`` the entry's converter settings; the returned dict goes
into the folder's manifest. Converters must be deterministic (the same inputs give the same bytes), because the
result is checked against a sha256 recorded in the project.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from prh_stitch.registry import Registry

Converter = Callable[..., Dict[str, Any]]
CONVERTERS: Registry[Converter] = Registry("zoo converter")


def _register() -> None:
    # Imported lazily: each converter pulls in its own fetch-time library (onnx, gguf, pyarrow) only when it runs.
    def lazy(module: str, function: str) -> Converter:
        def run(*args: Any, **kwargs: Any) -> Dict[str, Any]:
            import importlib

            return getattr(importlib.import_module(f"prh_stitch.zoo.converters.{module}"), function)(*args, **kwargs)

        return run

    CONVERTERS.register("split_zip_hf_folder")(lazy("split_zip", "convert_split_zip"))
    CONVERTERS.register("onnx_bert")(lazy("onnx_bert", "convert_onnx_bert"))
    CONVERTERS.register("glove_npy_parquet")(lazy("glove", "convert_glove"))
    CONVERTERS.register("gguf_llama")(lazy("gguf_llama", "convert_gguf_llama"))
    CONVERTERS.register("torchvision_pth")(lazy("torchvision_pth", "convert_torchvision_pth"))


_register()
