"""Backbones (embedding networks) shared by the methods, registered by name."""

from fsltool.models.backbones import BACKBONES, build_backbone

__all__ = ["BACKBONES", "build_backbone"]
