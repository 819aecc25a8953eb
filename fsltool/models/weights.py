"""Pretrained backbone weights from a local file (``backbone_options.weights``): a PyTorch state_dict
(``.pt`` / ``.pth``, read with ``weights_only``, so nothing in it runs) or ``.safetensors``. Never a download."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from fsltool.errors import FsltoolError
from fsltool.models.backbones import HEAD_KEYS, Backbone

# Prefixes a state_dict may carry in front of the feature network's own names: a whole fsltool method
# ("backbone.features."), an fsltool Backbone ("features."), or a checkpoint wrapper ("module." from DDP).
_PREFIXES = ("module.", "backbone.", "features.")
_SHOWN = 3  # keys named in an error message


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FsltoolError(f"{path}: backbone weights file not found (backbone_options.weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FsltoolError(f"{path}: not a readable weights file ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a common checkpoint wrapper
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FsltoolError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    return state


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the wrapper prefixes every key shares, so all three layouts name the feature network's tensors.
    Normalisation statistics are the data file's, never a weights file's: they are dropped first."""
    state = {key: value for key, value in state.items() if key.split(".")[-2:-1] != ["normalize"]}
    for prefix in _PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def load_backbone_weights(backbone: Backbone, backbone_name: str, path: str | Path) -> None:
    """Load ``path`` into the backbone's feature network exactly: every tensor present, none left over, every
    shape equal; otherwise a one-line error naming the first few offending keys and the file. A classifier
    head in the file (torchvision's ``fc``) is left out."""
    state = {key: value for key, value in _strip_prefixes(read_state_dict(path)).items()
             if not key.startswith(HEAD_KEYS.get(backbone_name, ()))}
    load_feature_state(backbone, backbone_name, state, str(path))


def load_feature_state(backbone: Backbone, backbone_name: str, state: dict[str, torch.Tensor], source: str) -> None:
    """``state`` (the feature network's names) into ``backbone.features``, exactly, or a one-line error naming
    ``source`` and the first few keys that do not fit."""
    path = source
    expected = backbone.features.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = [f"missing {_few(missing)}" if missing else "", f"unexpected {_few(unexpected)}" if unexpected else ""]
        raise FsltoolError(f"{path}: weights do not fit backbone {backbone_name!r}: {'; '.join(p for p in parts if p)}")
    mismatched = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
                  if state[key].shape != value.shape]
    if mismatched:
        raise FsltoolError(f"{path}: weights do not fit backbone {backbone_name!r}: shape mismatch {_few(mismatched)}")
    backbone.features.load_state_dict(state)


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")
