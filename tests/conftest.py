"""Shared fixtures and the hypothesis profiles.

``HYPOTHESIS_PROFILE=ci`` (set by ``.ci/run``) keeps property tests fast and derandomised; ``dev``
draws more examples.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One thread: the tensors here are small, and a second thread only costs start-up and contention.
torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every available device: CPU always, CUDA when present."""
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request):
    """Both floating dtypes the library supports."""
    return request.param


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def ndim(request):
    """Number of spatial dimensions."""
    return request.param


def record_calls(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` by a wrapper that records each call's ``(args, kwargs)`` and calls through."""
    calls: list = []
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return inner(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded for a property test (hypothesis does not seed torch)."""
    return torch.Generator().manual_seed(int(seed))


class SpySchedule:
    """A noise schedule that delegates every member to another and records the methods called, in order."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def method(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)

        return method


class Recorder:
    """Wraps a denoiser and records the input and the level of every call."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, x, gamma, condition):
        self.calls.append((x.clone(), gamma.clone()))
        return self.fn(x, gamma, condition)
