r"""Feature extractors for the Frechet distances: a fixed random-feature network, and how to use Inception-v3.

The FID of Heusel et al. (2017) uses the 2048 pooled features of an ImageNet-trained Inception-v3.
plasticine downloads no weights: :class:`RandomFeatures` is the default extractor, a network of
seeded random convolutions ("random features", not learned ones), and any module mapping
``(B, 1, H, W)`` images to ``(B, F)`` features can take its place (see the recipe in
:class:`RandomFeatures` for a local Inception-v3 file). Distances computed with different extractors,
seeds or input ranges are not comparable: record which one was used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.shapes import check_shape
from ..core.validate import check_int

__all__ = ["RandomFeatures", "image_features"]


class RandomFeatures(nn.Module):
    r"""Random features: a fixed network of seeded random convolutions, no trained or downloaded weights.

    ``depth`` stages of a 3x3 convolution (stride 2, padding 1, weights drawn from
    :math:`\mathcal N(0, 2 / (9 c_\mathrm{in}))`, He initialisation, biases 0) followed by a ReLU,
    with ``width``, ``2 width``, ``4 width``, ... channels; the features are the global average and
    the global standard deviation of every channel of every stage, concatenated. The weights come
    from ``torch.Generator().manual_seed(seed)`` on the CPU, so one seed gives one network; they are
    buffers, not parameters (nothing to train, no gradient). Such a network is a weak but
    reproducible stand-in for a learned extractor: it responds to local contrast and texture at
    several scales. Scale the images to a common range (e.g. ``[0, 1]``) first: the features are
    not invariant to intensity scaling.

    A local Inception-v3 file (the FID's extractor), if you have one, can replace it; for example
    with torchvision's architecture and a state dict saved from its ImageNet weights::

        import torchvision

        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        net.load_state_dict(torch.load("inception_v3_imagenet.pth", map_location="cpu"))
        net.fc = torch.nn.Identity()  # the 2048 pooled features
        net.eval()
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

        def inception(x):  # (B, 1, H, W) in [0, 1] -> (B, 2048)
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            return net((x.expand(-1, 3, -1, -1) - mean) / std)

        frechet_distance(image_features(a, inception), image_features(b, inception))

    (The FID's reference numbers use the TensorFlow port of those weights, ``pt_inception-2015-12-05``;
    torchvision's differ slightly.)

    Args:
        width: channels of the first stage (at least 1).
        depth: number of stages (at least 1); each halves the image size.
        seed: seed of the random weights.

    Shape:
        input: ``(B, 1, H, W)``; out: ``(B, F)`` with ``F = 2 width (2^depth - 1)``.
    """

    def __init__(self, width: int = 16, depth: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.width = check_int(width, "width", 1)
        self.depth = check_int(depth, "depth", 1)
        self.seed = check_int(seed, "seed")
        generator = torch.Generator().manual_seed(self.seed)
        c_in = 1
        for k in range(self.depth):
            c_out = self.width * 2**k
            w = torch.randn(c_out, c_in, 3, 3, generator=generator, dtype=torch.float64) * (2.0 / (9 * c_in)) ** 0.5
            self.register_buffer(f"weight{k}", w.float())
            c_in = c_out

    @property
    def num_features(self) -> int:
        """``F``, the length of a feature vector."""
        return 2 * self.width * (2**self.depth - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The random features of each image.

        Args:
            images: single-channel 2D images, at least ``2^depth`` pixels along each axis.

        Returns:
            The features, in the images' floating dtype.

        Shape:
            images: ``(B, 1, H, W)``; out: ``(B, F)``.
        """
        dims = check_shape(images, "B 1 *S", "images", spatial=(2,), floating=True)
        if min(dims["S"]) < 2**self.depth:
            raise ValueError(f"images: expected at least {2**self.depth} pixels along each axis for depth {self.depth}, got {dims['S']}")
        x = images
        out = []
        for k in range(self.depth):
            x = F.relu(F.conv2d(x, getattr(self, f"weight{k}").to(x.dtype), stride=2, padding=1))
            flat = x.flatten(2)
            out += [flat.mean(2), flat.std(2, correction=0)]
        return torch.cat(out, 1)


def image_features(
    images: torch.Tensor, extractor: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 64
) -> torch.Tensor:
    """Features of a set of images, in batches and without gradients, for :func:`~plasticine.metrics.frechet_distance`.

    Args:
        images: the images.
        extractor: a callable (e.g. an ``nn.Module`` in eval mode) mapping a batch of images to
            ``(b, F)`` features; None for ``RandomFeatures()`` (seed 0) on the images' device.
        batch_size: images per call of the extractor (at least 1).

    Returns:
        The features of every image, in order.

    Raises:
        ValueError: for a bad ``batch_size`` or an extractor that returns no ``(b, F)`` tensor.

    Shape:
        images: ``(N, 1, H, W)``; out: ``(N, F)``.
    """
    check_shape(images, "B 1 *S", "images", spatial=(2,), floating=True)
    batch_size = check_int(batch_size, "batch_size", 1)
    if extractor is None:
        extractor = RandomFeatures().to(images.device)
    parts = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size]
            f = extractor(chunk)
            if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != chunk.shape[0]:
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(f"extractor: expected a ({chunk.shape[0]}, F) tensor of features, got {got}")
            parts.append(f)
    return torch.cat(parts, 0)
