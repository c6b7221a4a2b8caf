"""plasticine: traceable medical image translation.

Intensity is translated by a conditional diffusion model, shape by a diffeomorphic registration,
so every translated image comes with the forward deformation phi and its inverse.
"""

__version__ = "0.1.0"
