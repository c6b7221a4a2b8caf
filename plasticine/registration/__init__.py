"""Registration: SVF integrators, registration networks and swappable registration backends."""

from .integrators import RK4, Euler, ScalingAndSquaring, auto_squaring_steps, integrate_euler, integrate_rk4, scaling_and_squaring

__all__ = ["RK4", "Euler", "ScalingAndSquaring", "auto_squaring_steps", "integrate_euler", "integrate_rk4", "scaling_and_squaring"]
