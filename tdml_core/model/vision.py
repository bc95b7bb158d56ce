"""Guarded access to torchvision's pure-Python parts (models, transforms).

The torchvision wheel that pins torch 2.13.0 may ship a C extension built for
another torch (a CUDA build on a CPU machine); then ``import torchvision`` fails
in ``_meta_registrations`` with "operator torchvision::nms does not exist".
TDML only needs the pure-Python parts, so when the normal import fails we
register a bare package object for ``torchvision`` (skipping its ``__init__``,
which is what loads the extension) and import the submodules from it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types


class TorchvisionUnavailable(ImportError):
    pass


def _bare_package() -> types.ModuleType:
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise TorchvisionUnavailable(
            "torchvision is not installed; install the release that pins this torch "
            "with `pip install --no-deps torchvision==0.28.0`"
        )
    pkg = types.ModuleType("torchvision")
    pkg.__path__ = [os.path.dirname(spec.origin)]
    pkg.__file__ = spec.origin
    pkg.__package__ = "torchvision"
    return pkg


def torchvision_module(name: str) -> types.ModuleType:
    """Import ``torchvision.<name>`` (e.g. ``models``) with or without its C extension."""
    try:
        return importlib.import_module(f"torchvision.{name}")
    except TorchvisionUnavailable:
        raise
    except (ImportError, RuntimeError, OSError):
        # A half-imported torchvision (failed __init__) must not stay in sys.modules.
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
        sys.modules["torchvision"] = _bare_package()
        return importlib.import_module(f"torchvision.{name}")
