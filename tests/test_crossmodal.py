"""The real MR -> CT case (plasticine.data.crossmodal) and the baselines of benchmarks/crossmodal.py.

The data tests need Debian's mricron-data (Colin27, the default MR), nilearn (the MNI152 template,
the other MR) and Debian's invesalius-examples (the CT); they skip without them. The baseline tests
run everywhere.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage as ndi
import torch

from plasticine.data import crossmodal as cm
from plasticine.data import crossmodal_case
from plasticine.data.system import MRICRON_DIR

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "crossmodal.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("crossmodal_benchmark", _BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()

_ct_missing = [] if cm.CT_PATH.is_file() else [f"{cm.CT_PATH} is missing (apt-get install invesalius-examples)"]
_missing = _ct_missing + ([] if (MRICRON_DIR / "ch2.nii.gz").is_file() else [f"{MRICRON_DIR / 'ch2.nii.gz'} is missing (apt-get install mricron-data)"])
_missing += [] if importlib.util.find_spec("nibabel") is not None else ["nibabel is not installed (Colin27 is NIfTI: pip install 'plasticine[io]')"]
_mni_missing = _ct_missing + ([] if importlib.util.find_spec("nilearn") is not None else ["nilearn is not installed (pip install nilearn)"])
needs_data = pytest.mark.skipif(bool(_missing), reason="; ".join(_missing) or "data present")
needs_mni = pytest.mark.skipif(bool(_mni_missing), reason="; ".join(_mni_missing) or "data present")


@pytest.fixture(scope="module")
def case():
    return crossmodal_case(64)


def _extent(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


# -- the loader -----------------------------------------------------------------------------------
@needs_data
def test_shapes_dtypes_and_ranges(case):
    assert case.pixel_mm == 3.25 and case.source_name == "colin27"
    n_mr, n_ct = len(case.source_slices), len(case.target_slices)
    assert n_mr >= 20 and n_ct >= 20
    for name, n in (("source", n_mr), ("source_brain", n_mr), ("source_head", n_mr), ("target", n_ct), ("target_intracranial", n_ct), ("target_head", n_ct)):
        a = getattr(case, name)
        assert a.shape == (n, 64, 64), name
        assert a.dtype == (np.float32 if name in ("source", "target") else np.bool_), name
    for image in (case.source, case.target):
        assert image.min() >= 0.0 and image.max() <= 1.0 and np.isfinite(image).all()
    assert case.target.max() == 1.0  # bone saturates the window
    # superior to inferior in both: template z descending (1 mm), CT axis-1 index ascending (0.957 mm)
    assert np.all(np.diff(case.source_slices) == -1) and np.all(np.diff(case.target_slices) == 1)


@needs_data
def test_masks_are_sane(case):
    for name in ("source_brain", "source_head", "target_intracranial", "target_head"):
        assert getattr(case, name).sum((1, 2)).min() > 100, f"{name} has an empty or tiny slice"
    assert not (case.target_intracranial & ~case.target_head).any()
    assert (case.source_brain & ~case.source_head).sum() <= 1e-3 * case.source_brain.sum()
    # the skull ring just outside the intracranial mask is the brightest tissue, on every slice
    t, ic = case.target, case.target_intracranial
    for i in range(len(t)):
        ring = ndi.binary_dilation(ic[i], iterations=2) & ~ic[i]
        scalp = case.target_head[i] & ~ndi.binary_dilation(ic[i], iterations=4)
        assert t[i][ring].mean() > 0.5 > 0.2 > t[i][ic[i]].mean(), i
        assert t[i][ring].mean() > 2 * t[i][scalp].mean(), i
    # the MR is a whole head: a dark skull band lies between the brain and the bright scalp
    for i in range(len(case.source)):
        brain, head = case.source_brain[i], case.source_head[i]
        skull = ndi.binary_dilation(brain, iterations=2) & ~ndi.binary_dilation(brain, iterations=1)
        scalp = head & ~ndi.binary_erosion(head, iterations=2)
        assert case.source[i][skull].mean() < min(case.source[i][brain].mean(), case.source[i][scalp].mean()), i
    # and the brain truth is closed over the sulci: one smooth region, no holes
    assert all(ndi.label(b)[1] == 1 and not (ndi.binary_fill_holes(b) & ~b).any() for b in case.source_brain)


@needs_mni
def test_the_mni152_source_is_skull_stripped():
    mni = crossmodal_case(64, source="mni152")
    assert mni.source_name == "mni152"
    # the brain is the bright part of the head: there is no scalp or skull around it
    assert mni.source[mni.source_brain].mean() > 0.5
    with pytest.raises(ValueError, match="source: expected one of"):
        crossmodal_case(64, source="ct")


@needs_data
def test_orientation_agrees_between_domains(case):
    mr, ct = case.source_brain, case.target_intracranial
    # both stacks run from the vertex down: the section grows with the slice index
    for stack in (mr, ct):
        areas = stack.sum((1, 2))
        assert np.corrcoef(np.arange(len(areas)), areas)[0, 1] > 0.95
    # rows are anterior-posterior in both: the deeper sections are longer than wide
    for stack in (mr, ct):
        deep = stack[-len(stack) // 4 :]
        assert all(_extent(s)[0] > _extent(s)[1] for s in deep)
    # at the deepest slice, the anterior-posterior extents agree within 25 %
    ap_mr, ap_ct = _extent(mr[-1])[0], _extent(ct[-1])[0]
    assert abs(ap_mr - ap_ct) <= 0.25 * max(ap_mr, ap_ct)
    # the heads are centred alike: mean centroid rows and columns within 5 pixels (15 mm)
    for axis in (0, 1):
        c_mr = np.mean([np.nonzero(s)[axis].mean() for s in case.source_head])
        c_ct = np.mean([np.nonzero(s)[axis].mean() for s in case.target_head])
        assert abs(c_mr - c_ct) < 5, (axis, c_mr, c_ct)


@needs_mni
def test_mr_brain_mask_is_nilearns():
    from nilearn.datasets import load_mni152_brain_mask

    ours = cm._read_mni() > 0.2
    assert np.array_equal(ours, np.asarray(load_mni152_brain_mask().dataobj) > 0)


def test_ct_window_is_the_documented_mapping():
    hu = np.array([-1024.0, -100.0, 450.0, 1000.0, 3000.0])
    assert np.allclose(cm.ct_window(hu), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="size: expected an int >= 16"):
        crossmodal_case(8)
    with pytest.raises(ValueError, match="min_area_fraction"):
        crossmodal_case(64, min_area_fraction=0.0)
    with pytest.raises(ValueError, match="field_of_view_mm"):
        crossmodal_case(64, field_of_view_mm=float("nan"))


def test_missing_files_name_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(cm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install nilearn"):
        crossmodal_case(64, source="mni152")
    monkeypatch.undo()
    if importlib.util.find_spec("nilearn") is not None:
        monkeypatch.setattr(cm, "CT_PATH", tmp_path / "Cranium.inv3")
        with pytest.raises(FileNotFoundError, match="apt-get install invesalius-examples"):
            crossmodal_case(64)


def test_a_changed_file_fails_loudly(monkeypatch, tmp_path):
    fake = tmp_path / "Cranium.inv3"
    fake.write_bytes(b"not the CT")
    monkeypatch.setattr(cm, "CT_PATH", fake)
    with pytest.raises(RuntimeError, match="expected sha256 3b34f11f"):
        cm._read_cranium()


# -- the benchmark's baselines -----------------------------------------------------------------------
def test_histogram_match_by_hand():
    image = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    mask = np.array([[True, True], [True, False]])
    out = bench.histogram_match(image, mask, np.array([30.0, 10.0, 20.0]))
    assert np.array_equal(out, np.array([[10.0, 20.0], [30.0, 0.0]], dtype=np.float32))
    # ties keep equal values; a reference 4 times larger gives its quantiles at levels i / n
    out = bench.histogram_match(np.array([5.0, 5.0, 7.0, 9.0]), np.ones(4, bool), np.arange(1.0, 17.0))
    assert out.tolist() == [8.0, 8.0, 12.0, 16.0]


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 60), k=st.integers(1, 4))
def test_histogram_match_gives_the_reference_quantiles(seed, n, k):
    g = np.random.default_rng(seed)
    image = g.random((n, 7)).astype(np.float32)
    mask = np.zeros_like(image, bool)
    mask[:, : 1 + seed % 7] = True
    reference = g.normal(size=mask.sum() * k)
    out = bench.histogram_match(image, mask, reference)
    assert np.all(out[~mask] == 0)
    # m distinct source values at levels i / m take the reference's order statistics k*i - 1
    assert np.allclose(np.sort(out[mask]), np.sort(reference)[k - 1 :: k].astype(np.float32), atol=1e-6)
    # and the mapping keeps the order of the source
    v, w = image[mask], out[mask]
    assert np.all(np.diff(w[np.argsort(v)]) >= 0)


def test_histogram_match_refuses_empty_inputs():
    with pytest.raises(ValueError, match="nonempty"):
        bench.histogram_match(np.zeros((2, 2)), np.zeros((2, 2), bool), np.ones(3))


def test_invert_inside():
    image = np.array([[0.0, 0.25], [0.75, 1.0]])
    head = np.array([[True, True], [False, True]])
    assert bench.invert_inside(image, head).tolist() == [[1.0, 0.75], [0.0, 0.0]]




def test_split_holds_out_every_fourth_slice():
    assert bench.split(9, 4) == ([0, 1, 3, 4, 5, 7, 8], [2, 6])


# -- a small version of the benchmark's generation check ------------------------------------------
@pytest.fixture(scope="module")
def small_ct_model():
    """The default translator's denoiser trained 300 steps on 32 x 32 CT slices (Algorithm 2, own head masks)."""
    from plasticine.recipes import TrainingRecipe, build_translator, train_translator

    small = crossmodal_case(32)
    train, held = bench.split(len(small.target), 4)
    ct = torch.from_numpy(small.target)[:, None]
    mr = torch.from_numpy(small.source)[:, None]
    with torch.random.fork_rng():
        translator = build_translator(2, 1, sampler_steps=10, seed=0)
        recipe = TrainingRecipe(diffusion_steps=300, registration_steps=1, batch_size=4, seed=0, checkpoint_every=0, progress="none")
        train_translator(translator, mr, ct[train], recipe)
    return small, translator, ct[held]


@needs_data
@pytest.mark.parametrize("sampler", ["DDIMSampler", "AncestralSampler", "DPMSolverPP"])
def test_generation_from_pure_noise_is_in_range_and_ct_like_with_every_sampler(small_ct_model, sampler):
    """From pure noise (k0 = K), conditioned on held-out CT head masks: inside [0, 1] and CT-like.

    Bound: the Bhattacharyya distance of the intensities inside the head to the held-out CT is below
    0.05 and below half that of the MR slices (measured 0.006 with each of the three samplers, the
    MR 0.52).
    """
    from plasticine import diffusion
    from plasticine.metrics import bhattacharyya_distance, intensity_histogram
    from plasticine.registration import IdentityRegistration

    small, translator, held = small_ct_model
    chosen = getattr(diffusion, sampler)(steps=10, prediction="x0", clip=(-1.0, 1.0))
    model = translator.replace(sampler=chosen, registration=IdentityRegistration()).eval()
    out = model.translate(held, start_step=model.num_steps, generator=torch.Generator().manual_seed(0)).image
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    head = small.target_head[bench.split(len(small.target), 4)[1]]
    reference = intensity_histogram(held[:, 0].numpy()[head], 32)
    generated = bhattacharyya_distance(intensity_histogram(out[:, 0].numpy()[head], 32), reference)
    mr = bhattacharyya_distance(intensity_histogram(small.source[small.source_head], 32), reference)
    assert generated < min(0.05, mr / 2), (generated, mr)
