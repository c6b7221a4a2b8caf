"""Image-comparison metrics: paired scores in a mask (MAE, PSNR, SSIM)."""

from .image import mae, psnr, ssim

__all__ = ["mae", "psnr", "ssim"]
