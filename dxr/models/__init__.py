"""Models of DiffusionXRay: the (conditional) denoising UNet and MUNIT."""

from dxr.models.munit import MUNIT, MUNITConfig
from dxr.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "MUNIT", "MUNITConfig"]
