"""``from bus.model import BUSModel, BUSConfig, BaselineModel``: the models live in
:mod:`bus.models` (one file per part); this module keeps the old import path."""
from .models.config import BUSConfig
from .models.simple import BaselineModel, BUSModel, FusionEncoder

__all__ = ["BUSConfig", "BUSModel", "BaselineModel", "FusionEncoder"]
