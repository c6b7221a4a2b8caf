"""The population registration: the systematic change between two unpaired sets, from their templates."""

from __future__ import annotations

import pytest
import torch
from conftest import make_generator
from hypothesis import given
from hypothesis import strategies as st

from plasticine.checkpoint import load_translator, save_component
from dataclasses import replace

from plasticine.demo import QUICK, DemoConfig, _dice, make_cohort
from plasticine.recipes import TrainingRecipe, build_translator, train_translator
from plasticine.registration import IterativeRegistration, PopulationRegistration


def _cheap(shape):
    """A population registration whose template registration is a few iterations at one level."""
    return PopulationRegistration(shape, IterativeRegistration(levels=(1,), iterations=(3,)))


#: The demo's T1 -> PD task (its grid, half its training subjects).
CASE = replace(DemoConfig(), train_subjects=24)


@pytest.fixture(scope="module")
def t1pd():
    """Unpaired training sets of the T1 -> PD task and test subjects with exact truth."""
    train = make_cohort(CASE, CASE.train_subjects, CASE.seed + 1, include_real=False)
    test = make_cohort(CASE, 4, CASE.seed, include_real=True)
    # unpaired: the targets come from other subjects (another seed) and in another order
    other = make_cohort(CASE, CASE.train_subjects, CASE.seed + 7, include_real=False)
    return train.sources, other.targets.flip(0), test


def _scores(deformation, test):
    traced = deformation.labels_to_target(test.source_masks, 2)
    dice = [_dice(traced[i], test.target_masks[i]) for i in range(len(test))]
    identity = [_dice(test.source_masks[i], test.target_masks[i]) for i in range(len(test))]
    brain = test.brain[:, 0]
    truth = test.field.forward.to(deformation.forward.dtype)
    epe = float((deformation.forward - truth).norm(dim=1)[brain].mean())
    return sum(dice) / len(dice), sum(identity) / len(identity), epe, float(truth.norm(dim=1).expand_as(brain)[brain].mean())


def test_the_systematic_change_is_recovered_from_unpaired_sets(t1pd):
    sources, targets, test = t1pd
    reg = PopulationRegistration(tuple(CASE.shape))
    sizes = reg.fit(sources, targets)
    assert 0 < sizes["max_displacement"] < 3 * CASE.enlargement
    dice, identity, epe, epe_identity = _scores(reg.register(test.sources), test)
    # the true field phi_E is the independent reference: the traced ventricles match the truly
    # enlarged ones far better than without a deformation, and the field is closer to phi_E
    assert dice > 0.9 and dice > identity + 0.1, (dice, identity)
    assert epe < 0.85 * epe_identity, (epe, epe_identity)
    assert reg.register(test.sources).folding_fraction().max() == 0


def test_the_unpaired_recipe_trains_and_traces(tmp_path):
    sources = make_cohort(QUICK, 4, 1, include_real=False).sources
    targets = make_cohort(QUICK, 4, 2, include_real=False).targets
    test = make_cohort(QUICK, 2, 0, include_real=True)
    t = build_translator(2, 1, structure="foreground+mind", registration="population", shape=tuple(QUICK.shape), sampler_steps=4)
    losses = train_translator(t, sources, targets, TrainingRecipe(diffusion_steps=3, batch_size=4, progress="none", checkpoint_every=0))
    assert set(losses["registration"]) == {"max_displacement", "mean_displacement"}
    result = t.translate(test.sources, generator=make_generator(0))
    assert result.image.shape == test.targets.shape and torch.isfinite(result.image).all()
    # the checkpoint keeps the fitted field
    path = tmp_path / "t.pt"
    save_component(t, path)
    back = load_translator(path)
    assert torch.equal(back.registration.register(test.sources).forward, result.deformation.forward)


@given(st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_every_item_gets_the_one_fitted_deformation(batch, seed):
    g = make_generator(seed)
    reg = _cheap((9, 7))
    reg.fit(torch.rand(3, 1, 9, 7, generator=g), torch.rand(2, 1, 9, 7, generator=g))
    d = reg.register(torch.rand(batch, 1, 9, 7, generator=g))
    assert d.forward.shape == (batch, 2, 9, 7)
    for i in range(batch):
        assert torch.equal(d.forward[i], reg.forward_field[0]) and torch.equal(d.inverse[i], reg.inverse_field[0])


def test_bad_use_is_refused():
    reg = _cheap((9, 7))
    with pytest.raises(ValueError, match="not fitted"):
        reg.register(torch.rand(1, 1, 9, 7))
    with pytest.raises(ValueError, match="grid"):
        reg.fit(torch.rand(2, 1, 9, 8), torch.rand(2, 1, 9, 7))
    with pytest.raises(ValueError, match="at least one"):
        reg.fit([], torch.rand(2, 1, 9, 7))
    bad = torch.rand(2, 1, 9, 7)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="targets"):
        reg.fit(torch.rand(2, 1, 9, 7), bad)
    assert not bool(reg.fitted)
    reg.fit(torch.rand(2, 1, 9, 7), torch.rand(2, 1, 9, 7))
    with pytest.raises(ValueError, match="grid"):
        reg.register(torch.rand(1, 1, 8, 7))
    with pytest.raises(ValueError, match="shape"):
        PopulationRegistration((9,))
    with pytest.raises(ValueError, match="shape"):
        build_translator(2, 1, registration="population")
    with pytest.raises(ValueError, match="shape"):
        build_translator(2, 1, shape=(9, 7))
