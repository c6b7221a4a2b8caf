r"""Optimiser strategies of :class:`~plasticine.registration.IterativeRegistration`.

A strategy minimises an energy :math:`E(v)` of a velocity field from a start field for a given
number of iterations and returns the field it reached. Three ship, each holding its own settings:

* :class:`GradientDescent` (the default): steepest descent whose update is smoothed by a Gaussian
  and scaled so that it moves at most ``lr`` voxels, the update rule of SyN and demons;
* :class:`Adam`: :class:`torch.optim.Adam` on the field;
* :class:`LBFGS`: :class:`torch.optim.LBFGS` with a strong-Wolfe line search, ``iterations`` being
  its ``max_iter``.

Any object with a ``minimise(energy, start, iterations)`` method (:class:`OptimizerStrategy`) can
take their place.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from ..core.config import Configurable
from ..core.filters import gaussian_smooth
from ..core.validate import check_int, check_number

__all__ = ["OptimizerStrategy", "GradientDescent", "Adam", "LBFGS"]

Energy = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class OptimizerStrategy(Protocol):
    """Minimises an energy of a field, starting from ``start``, in ``iterations`` steps.

    ``energy(v)`` returns a differentiable scalar; the strategy runs with gradients enabled (the
    caller enables them) and returns the field it reached, detached.

    Shape:
        start: any (a velocity field ``(B, N, *S)`` for the iterative backend); out: same as start.
    """

    def minimise(self, energy: Energy, start: torch.Tensor, iterations: int) -> torch.Tensor: ...


class _Strategy(Configurable, config_abstract=True):
    """Shared by the strategies: the step size ``lr``, the configuration and a repr of it."""

    def __init__(self, lr: float = 0.25):
        self.lr = check_number(lr, "lr", 0, min_open=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    @staticmethod
    def _with_torch_optimizer(make: Callable, energy: Energy, start: torch.Tensor, steps: int) -> torch.Tensor:
        """Run ``steps`` steps of the torch optimiser ``make([param])`` on a copy of ``start``."""
        param = start.clone().requires_grad_(True)
        opt = make([param])

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            e = energy(param)
            e.backward()
            return e

        for _ in range(steps):
            opt.step(closure)
        return param.detach()


class GradientDescent(_Strategy):
    """Steepest descent with a smoothed, length-limited update (the SyN / demons rule), stopped when converged.

    Each step computes :math:`g = \\nabla E(v)`, smooths it by a Gaussian of ``update_smoothing``
    voxels and moves :math:`v \\leftarrow v - \\mathrm{lr}\\, G * g / \\max_p |G * g(p)|`, so that no
    voxel moves more than ``lr`` voxels in one step.

    **Convergence.** With ``tolerance > 0`` the descent stops before ``iterations`` steps once the
    mean energy of the last ``window`` steps is lower than the mean of the ``window`` steps before
    by at most ``tolerance`` relative to it: after evaluating :math:`E_k` (``k >= 2w - 1``) it stops
    if :math:`\\bar E_{\\text{before}} - \\bar E_{\\text{last}} \\le \\mathrm{tolerance}\\,
    |\\bar E_{\\text{before}}|` with :math:`\\bar E_{\\text{last}}` the mean of
    :math:`E_{k-w+1}, \\dots, E_k` and :math:`\\bar E_{\\text{before}}` that of
    :math:`E_{k-2w+1}, \\dots, E_{k-w}`, and returns the field :math:`v_k` of that evaluation.
    Means over windows, not single values: near the optimum the fixed-length steps zig-zag, and
    single energies then rise and fall from step to step. Reading :math:`E_k` synchronises with the
    device once per step; ``tolerance=0`` never stops early and never reads it.

    Args:
        lr: largest update in voxels (of the resolution level being optimised).
        update_smoothing: Gaussian sigma in voxels of the update (0: no smoothing).
        tolerance: relative decrease of the mean energy from one ``window`` of steps to the
            next at or below which the descent stops (0: run all ``iterations``).
        window: number of steps ``w`` in each of the two means compared (positive).

    Shape:
        start: ``(B, N, *S)``; out: ``(B, N, *S)``.
    """

    def __init__(self, lr: float = 0.25, update_smoothing: float = 6.0, tolerance: float = 5e-4, window: int = 5):
        super().__init__(lr)
        self.update_smoothing = check_number(update_smoothing, "update_smoothing", 0)
        self.tolerance = check_number(tolerance, "tolerance", 0)
        self.window = check_int(window, "window", 1)
        self.last_iterations: int | None = None
        """Steps taken by the last :meth:`minimise` (``iterations``, or fewer when it converged)."""

    def converged(self, energies: list[float]) -> bool:
        """Whether the mean of the last ``window`` energies is at most ``tolerance`` (relative) below the mean of the ``window`` before.

        Args:
            energies: the energies evaluated so far, first to last.

        Shape:
            Not applicable (a list of floats).
        """
        w = self.window
        if self.tolerance <= 0 or len(energies) < 2 * w:
            return False
        before = sum(energies[-2 * w : -w]) / w
        last = sum(energies[-w:]) / w
        return before - last <= self.tolerance * abs(before)

    def minimise(self, energy: Energy, start: torch.Tensor, iterations: int) -> torch.Tensor:
        """Run at most ``iterations`` descent steps from ``start``; see the class.

        Shape:
            start: ``(B, N, *S)``; out: ``(B, N, *S)``.
        """
        param = start.clone().requires_grad_(True)
        spatial = tuple(range(2, start.dim()))
        energies: list[float] = []
        done = iterations
        for k in range(iterations):
            e = energy(param)
            if self.tolerance > 0:
                energies.append(float(e.detach()))
                if self.converged(energies):
                    done = k
                    break
            (grad,) = torch.autograd.grad(e, param)
            with torch.no_grad():
                step = gaussian_smooth(grad, self.update_smoothing) if self.update_smoothing > 0 else grad
                # largest vector length (a sum of squares: torch's norm(dim=1) is slow on the CPU)
                size = step.square().sum(1, keepdim=True).amax(dim=spatial, keepdim=True).sqrt()
                param -= self.lr * step / size.clamp(min=1e-12)
        self.last_iterations = done
        return param.detach()


class Adam(_Strategy):
    """:class:`torch.optim.Adam` on the field, one optimiser step per iteration.

    Args:
        lr: the learning rate.

    Shape:
        start: any; out: same as start.
    """

    def minimise(self, energy: Energy, start: torch.Tensor, iterations: int) -> torch.Tensor:
        """Run ``iterations`` Adam steps from ``start``.

        Shape:
            start: any; out: same as start.
        """
        return self._with_torch_optimizer(lambda p: torch.optim.Adam(p, lr=self.lr), energy, start, iterations)


class LBFGS(_Strategy):
    """:class:`torch.optim.LBFGS` with a strong-Wolfe line search; ``iterations`` is its ``max_iter``.

    Args:
        lr: the learning rate (initial step of the line search).

    Shape:
        start: any; out: same as start.
    """

    def minimise(self, energy: Energy, start: torch.Tensor, iterations: int) -> torch.Tensor:
        """Run one L-BFGS step of at most ``iterations`` iterations from ``start``.

        Shape:
            start: any; out: same as start.
        """
        return self._with_torch_optimizer(
            lambda p: torch.optim.LBFGS(p, lr=self.lr, max_iter=iterations, line_search_fn="strong_wolfe"), energy, start, 1
        )
