"""LCM families: Base-LCM (MSE), the Two-Tower and the One-Tower diffusion LCMs."""

from .base_lcm import BaseLCM
from .factory import build_model
from .one_tower import OneTowerLCM
from .two_tower import TwoTowerLCM

__all__ = ["BaseLCM", "OneTowerLCM", "TwoTowerLCM", "build_model"]
