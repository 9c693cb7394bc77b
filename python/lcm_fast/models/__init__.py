"""LCM families: Base-LCM (MSE) and the Two-Tower diffusion LCM."""

from .base_lcm import BaseLCM
from .factory import build_model
from .two_tower import TwoTowerLCM

__all__ = ["BaseLCM", "TwoTowerLCM", "build_model"]
