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


def test_contrast_randomized_training_conditions_on_maps_of_remapped_targets(monkeypatch):
    """Each step's condition is the structure map of the batch remapped by the curves drawn for it."""
    from plasticine import training
    from plasticine.training import ContrastRandomization

    x, y = _images(4, 0), _images(4, 1)
    seen = []
    real = training.ContrastRandomization.apply

    def spy(self, images, values, data_range):
        out = real(self, images, values, data_range)
        seen.append((images, out))
        return out

    monkeypatch.setattr(training.ContrastRandomization, "apply", spy)
    conditions = []
    objective = training.diffusion_objective
    import plasticine.recipes as recipes_module

    def recording(translator, batch, generator, **kwargs):
        conditions.append((batch, kwargs["condition"]))
        return objective(translator, batch, generator, **kwargs)

    monkeypatch.setattr(recipes_module, "diffusion_objective", recording)
    recipe = TrainingRecipe(diffusion_steps=3, registration_steps=1, batch_size=2, progress="none", contrast=ContrastRandomization(keep=0.0))
    runs = []
    for _ in range(2):
        t = build_translator(2, 1, structure="mind", sampler_steps=2, seed=0)
        train_translator(t, x, y, recipe)
        runs.append(t.state_dict())
    assert len(seen) == 6 and len(conditions) == 6
    for (images, remapped), (batch, condition) in zip(seen, conditions):
        assert torch.equal(images, batch) and not torch.allclose(remapped, batch)
        torch.testing.assert_close(condition, t.conditioning(t.structure_map(remapped)))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]), "contrast-randomised training is not reproducible"
    # with patches: the map of the whole remapped image, cut at the patch's corner
    seen.clear(), conditions.clear()
    t = build_translator(2, 1, structure="mind", sampler_steps=2, seed=0)
    train_translator(t, x, y, TrainingRecipe(**{**recipe.__dict__, "patch_size": (8, 6), "diffusion_steps": 2}))
    assert len(seen) == len(conditions) == 2
    for (images, remapped), (batch, condition) in zip(seen, conditions):
        assert images.shape[2:] == (16, 12) and batch.shape[2:] == condition.shape[2:] == (8, 6)
        whole = t.conditioning(t.structure_map(remapped))
        hits = [(i, j) for i in range(9) for j in range(7) if torch.allclose(batch[0], images[0, :, i : i + 8, j : j + 6])]
        assert any(torch.allclose(condition[0], whole[0, :, i : i + 8, j : j + 6]) for i, j in hits)
    monkeypatch.undo()
    plain = build_translator(2, 1, structure="mind", sampler_steps=2, seed=0)
    train_translator(plain, x, y, TrainingRecipe(**{**recipe.__dict__, "contrast": None}))
    assert any(not torch.equal(runs[0][k], plain.state_dict()[k]) for k in runs[0] if k.startswith("denoiser"))


def test_contrast_randomization_is_refused_where_it_cannot_act():
    from plasticine.training import ContrastRandomization

    x = _images(4, 0)
    recipe = TrainingRecipe(diffusion_steps=1, registration_steps=1, batch_size=2, progress="none", contrast=ContrastRandomization())
    with pytest.raises(ValueError, match="recipe.contrast: expected a translator with a data_range"):
        train_translator(build_translator(2, 1, data_range=None), x, x, recipe)
    with pytest.raises(ValueError, match="recipe.contrast: .* given conditions"):
        train_translator(build_translator(2, 1), x, x, recipe, conditions=torch.zeros(4, 2, 16, 12))
    with pytest.raises(ValueError, match="TrainingRecipe.contrast"):
        TrainingRecipe(contrast=0.5)


def test_the_default_translator_generates_in_the_warped_geometry_from_a_head_mask_condition():
    from plasticine.segmentation import ForegroundExtractor, MINDExtractor

    t = build_translator(2, 1)
    assert isinstance(t.structure, ForegroundExtractor)
    assert t.structure.config["fraction"] == 0.05 and t.structure.config["closing"] == 3
    fg, mind = build_translator(2, 1, structure="foreground+mind").structure.extractors
    assert isinstance(fg, ForegroundExtractor) and isinstance(mind, MINDExtractor) and mind.sigma == 2.5
    assert fg.config == t.structure.config
    assert t.sampler.config["prediction"] == "x0" and t.sampler.config["clip"] == (-1.0, 1.0) and t.sampler.config["steps"] == 20
    assert t.data_range == (0.0, 1.0) and t.start == "warped" and t.start_fraction == 1.0


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(("structure", "cls"), [("foreground+mind", "StackedExtractor"), ("foreground+rim", "StackedExtractor"), ("foreground", "ForegroundExtractor"), ("mind", "MINDExtractor"), ("kmeans", "KMeansExtractor"), ("potts", "PottsExtractor")])
def test_each_structure_map_sets_the_condition_channels(structure, cls, ndim):
    t = build_translator(ndim, 1, structure=structure, classes=3, sampler_steps=2)
    assert type(t.structure).__name__ == cls
    x = torch.rand(1, 1, *([12] * ndim), generator=make_generator(0))
    channels = t.structure_map(x).shape[1]
    assert t.conditioning.config["num_labels"] == channels == t.denoiser.settings.cond_channels
    if structure == "kmeans":
        assert channels == 3 and t.structure.max_iter == 50
    if structure == "foreground+rim":
        from plasticine.segmentation import RimExtractor

        head, rim = t.structure.extractors
        assert isinstance(rim, RimExtractor) and rim.depth == 10.0 and rim.foreground.config == head.config


def test_the_demo_settings_build_the_earlier_translator():
    from plasticine.segmentation import KMeansExtractor

    t = build_translator(2, 1, structure="kmeans", classes=4, prediction="eps", data_range=None, clip=False, start="source", start_fraction=0.6, sampler_steps=10)
    assert isinstance(t.structure, KMeansExtractor) and t.structure.num_classes == 4
    assert t.sampler.config["prediction"] == "eps" and t.sampler.config["clip"] is None
    assert t.data_range is None and t.start == "source" and t.start_fraction == 0.6


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("structure", "otsu"),
        ("classes", 0),
        ("mind_sigma", 0.0),
        ("mind_sigma", float("nan")),
        ("rim_depth", 0.5),
        ("prediction", "score"),
        ("data_range", (1.0, 0.0)),
        ("clip", "yes"),
        ("start", "target"),
        ("start_fraction", 1.5),
        ("sampler_steps", 0),
        ("channels", 0),
        ("registration", "ants"),
        ("shape", (9, 7)),
    ],
)
def test_every_option_is_checked_up_front(option, value, monkeypatch):
    import plasticine.registration.network as network

    def never(*args, **kwargs):
        raise AssertionError("a network was built before the options were checked")

    monkeypatch.setattr(network, "RegistrationNet", never)
    kwargs = {"channels": 1, option: value} if option == "channels" else {option: value}
    with pytest.raises(ValueError, match=option) as info:
        build_translator(2, **kwargs) if option == "channels" else build_translator(2, 1, **kwargs)
    assert "\n" not in str(info.value)


def test_the_mr_contrast_recipe_builds_fine_mind_and_trains_in_its_parametrisation():
    from plasticine.diffusion.prediction import prediction_target
    from plasticine.recipes import MR_CONTRAST_OPTIONS
    from plasticine.segmentation import ForegroundExtractor, MINDExtractor
    from plasticine.training import diffusion_objective

    t = build_translator(2, 1, **MR_CONTRAST_OPTIONS, sampler_steps=2)
    fg, mind = t.structure.extractors
    assert isinstance(fg, ForegroundExtractor) and isinstance(mind, MINDExtractor) and mind.sigma == MR_CONTRAST_OPTIONS["mind_sigma"]
    assert t.sampler.config["prediction"] == MR_CONTRAST_OPTIONS["prediction"] and t.sampler.config["clip"] == (-1.0, 1.0)
    y = _images(2, 3)
    x0 = t.to_diffusion(y)

    def oracle(prediction):
        def denoise(noisy, gamma, condition):  # the exact output of a parametrisation, from the known clean image
            g = gamma.double().reshape(-1, 1, 1, 1)
            eps = ((noisy.double() - g.sqrt() * x0) / (1 - g).sqrt()).float()
            return prediction_target(x0, eps, gamma, prediction)

        return denoise

    # stage 1 trains the sampler's parametrisation: its exact output has (almost) no loss, another has
    own = diffusion_objective(t, y, make_generator(1), denoiser=oracle(MR_CONTRAST_OPTIONS["prediction"]))
    other = diffusion_objective(t, y, make_generator(1), denoiser=oracle("eps" if MR_CONTRAST_OPTIONS["prediction"] != "eps" else "x0"))
    assert own < 1e-3 < other, (own, other)
