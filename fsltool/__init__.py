"""fsltool: few-shot classification by meta-learning, as a file-based command-line workflow, and a Python API
(docs/python-api.md): ``fsltool.load(path)`` gives a run, an exported model or an enrolled model to embed images,
enrol classes and predict with.

The API's names are imported on first use (PEP 562), so ``import fsltool`` stays light and a service that predicts
with an enrolled or exported model never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.7.1"

# Public name -> the module that defines it.
_API = {
    "load": "fsltool.api",
    "RunModel": "fsltool.api",
    "ExportedModel": "fsltool.api",
    "EnrolledModel": "fsltool.api",
    "EnrolledClasses": "fsltool.api",
    "Prediction": "fsltool.predict",
    "Ranked": "fsltool.predict",
    "FsltoolError": "fsltool.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'fsltool' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
