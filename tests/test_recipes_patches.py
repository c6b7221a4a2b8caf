"""Training on random patches (TrainingRecipe.patch_size): what each stage's networks are given."""

from __future__ import annotations

import itertools

import pytest
import torch

from plasticine.recipes import TrainingRecipe, build_translator, train_translator


def _windows(full, patch):
    for corner in itertools.product(*(range(s - p + 1) for s, p in zip(full.shape[1:], patch))):
        yield full[(slice(None),) + tuple(slice(a, a + p) for a, p in zip(corner, patch))]


def test_stages_see_patches_of_whole_image_maps_and_aligned_pairs():
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 1, 9, 10, 8, generator=g)
    target = 1.0 - source
    translator = build_translator(3, 1, structure="kmeans", classes=3, sampler_steps=2)
    seen = {"cond": [], "pairs": []}
    translator.denoiser.register_forward_hook(lambda m, args, out: seen["cond"].append(args[2].detach().clone()))
    translator.registration.network.register_forward_hook(lambda m, args, out: seen["pairs"].append((args[0].clone(), args[1].clone())))
    recipe = TrainingRecipe(diffusion_steps=2, registration_steps=2, batch_size=2, patch_size=(5, 6, 4), progress="none", checkpoint_every=0)
    train_translator(translator, source, target, recipe, paired=True)
    with torch.no_grad():
        maps = [translator.conditioning(translator.structure_map(y[None]))[0] for y in target]
    training = seen["cond"][:2]  # the two steps of stage 1 (stage 2 calls the denoiser for its noise cue)
    assert all(c.shape == (2, 3, 5, 6, 4) for c in training)
    for batch in training:  # stage 1: each condition is a window of the whole target's map
        for c in batch:
            assert any(torch.equal(c, w) for m in maps for w in _windows(m, (5, 6, 4)))
    # stage 2: source and target patches cut at one corner (the target is 1 - source voxelwise)
    pairs = [(x, y) for x, y in seen["pairs"] if x.shape[2:] == (5, 6, 4)]
    assert pairs and all(torch.equal(y, 1.0 - x) for x, y in pairs)
    assert not all(torch.equal(x[0], source[0, :, :5, :6, :4]) for x, _ in pairs)  # not always the first corner


def test_a_patch_larger_than_an_image_is_refused_before_training():
    translator = build_translator(3, 1, sampler_steps=2)
    source, target = torch.rand(2, 1, 10, 10, 10), torch.rand(2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"patch_size: target\[0\] of spatial size \(8, 8, 8\): patch: expected sizes in \[1, 8\] along axis 2"):
        train_translator(translator, source, target, TrainingRecipe(batch_size=2, patch_size=(4, 4, 9), progress="none"))
