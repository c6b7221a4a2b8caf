"""The recipe: one two-stage training that the command line and the demo share."""

from __future__ import annotations

import pytest
import torch
from conftest import make_generator

from plasticine.recipes import TrainingRecipe, build_translator, train_translator


def _images(n, seed):
    return torch.rand(n, 1, 16, 12, generator=make_generator(seed))


def test_both_stages_train_and_resume_to_the_same_weights(tmp_path):
    x, y = _images(4, 0), 1 - _images(4, 1)
    full = build_translator(2, 1, classes=3, sampler_steps=2, seed=0)
    recipe = TrainingRecipe(diffusion_steps=4, registration_steps=3, batch_size=2, checkpoint_every=2, progress="none")
    before = {k: v.clone() for k, v in full.state_dict().items()}
    losses = train_translator(full, x, y, recipe)
    assert set(losses) == {"denoiser", "registration"} and all(torch.isfinite(torch.tensor(list(v.values()))).all() for v in losses.values())
    after = full.state_dict()
    for part in ("denoiser", "registration"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(part)), f"{part} did not train"
    # a run interrupted in stage 2 (after 2 of its 3 steps) and run again ends with the same weights
    prefix = tmp_path / "m.pt"
    short = build_translator(2, 1, classes=3, sampler_steps=2, seed=0)
    train_translator(short, x, y, TrainingRecipe(diffusion_steps=4, registration_steps=2, batch_size=2, checkpoint_every=2, progress="none"), checkpoint_prefix=prefix)
    resumed = build_translator(2, 1, classes=3, sampler_steps=2, seed=0)
    train_translator(resumed, x, y, recipe, checkpoint_prefix=prefix)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_bad_inputs_are_refused_before_training():
    t = build_translator(2, 1, classes=3, sampler_steps=2)
    x = _images(4, 0)
    with pytest.raises(ValueError, match="source: 1 image"):
        train_translator(t, x[:1], x, TrainingRecipe(batch_size=2))
    with pytest.raises(ValueError, match="paired: expected as many"):
        train_translator(t, x[:3], x, TrainingRecipe(batch_size=2), paired=True)
    with pytest.raises(ValueError, match="conditions: expected one per target"):
        train_translator(t, x, x, TrainingRecipe(batch_size=2), conditions=torch.zeros(2, 3, 16, 12))
    with pytest.raises(ValueError, match="ndim"):
        build_translator(4, 1)


def test_augmented_training_is_seeded_and_differs_from_plain():
    from plasticine.training import Augmentation

    x, y = _images(4, 0), 1 - _images(4, 1)
    recipe = TrainingRecipe(diffusion_steps=2, registration_steps=2, batch_size=2, progress="none")
    runs = []
    for aug in (None, Augmentation(), Augmentation()):
        t = build_translator(2, 1, classes=3, sampler_steps=2, seed=0)
        train_translator(t, x, y, TrainingRecipe(**{**recipe.__dict__, "augmentation": aug}))
        runs.append(t.state_dict())
    plain, a, b = runs
    assert all(torch.equal(a[k], b[k]) for k in a), "augmented training is not reproducible"
    assert any(not torch.equal(a[k], plain[k]) for k in a if k.startswith("denoiser"))
