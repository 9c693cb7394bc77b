"""LCM families: Base-LCM (MSE), the Two-Tower and the One-Tower diffusion LCMs, Quant-LCM-D/-C."""

from .base_lcm import BaseLCM
from .factory import build_model
from .one_tower import OneTowerLCM
from .quant_lcm import QuantLCM
from .two_tower import TwoTowerLCM

__all__ = ["BaseLCM", "OneTowerLCM", "QuantLCM", "TwoTowerLCM", "build_model"]
