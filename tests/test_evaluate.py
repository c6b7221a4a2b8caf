"""The paper's evaluation: Table I aggregation by hand, the composed methods, and ``plasticine evaluate`` end to end."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from plasticine.checkpoint import load_component, load_translator, save_component
from plasticine.cli import main
from plasticine.evaluation import (
    METHODS,
    EvaluationSettings,
    distribution_metrics,
    segment,
    segmentation_scores,
    summarize,
    translate_methods,
)
from plasticine.io import ImageFolder, write_image
from plasticine.metrics import bhattacharyya_distance, intensity_histogram, mae
from plasticine.recipes import TrainingRecipe, build_translator, head_extractor, train_translator
from plasticine.registration import IdentityRegistration
from plasticine.segmentation import SegmentationUNet, dice, hausdorff95, iou

pytest.importorskip("PIL.Image", reason="the io extra (pillow) is not installed")


# -- Table I by hand ------------------------------------------------------------------------------
def test_summarize_by_hand():
    # case 0: class 1 predicted on 2 of 4 true voxels, no false positive; class 2 absent from both
    # case 1: class 2 predicted where there is none (HD95 undefined), class 1 perfect
    p0 = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    t0 = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    p1 = torch.tensor([[2, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    t1 = t0.clone()
    pred, truth = torch.stack([p0, p1])[:, None], torch.stack([t0, t1])[:, None]
    s = summarize(segmentation_scores(pred, truth, 3, spacing=(2.0, 1.0)))
    pc, mean = s["per_class"], s["mean"]
    # class 1: Dice 2*2/(2+4) = 2/3 and 1; IoU 1/2 and 1; accuracy 1/2 and 1
    assert pc["1"]["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert pc["1"]["iou"] == pytest.approx(0.75)
    assert pc["1"]["accuracy"] == pytest.approx(0.75)
    # class 2: case 0 has it nowhere (left out), case 1 only in the prediction: 0 and HD95 undefined
    assert pc["2"]["dice"] == 0.0 and pc["2"]["iou"] == 0.0 and pc["2"]["hd95"] is None and pc["2"]["hd95_undefined"] == 1
    # class 1 HD95: case 0 surface of the 2x2 block vs its top row: distances {0, 0, 1, 1} and {0, 0} -> 95th pct of
    # the pooled [0, 0, 1, 1, 0, 0] = 1 (vx), 2 mm along axis 0; case 1: 0
    assert pc["1"]["hd95"] == pytest.approx(0.5)
    assert pc["1"]["hd95_mm"] == pytest.approx(1.0)
    # means: pixel accuracy (14/16, 15/16); Dice over classes 1..2 per case: 2/3 (class 2 NaN) and (1 + 0)/2
    assert mean["accuracy"] == pytest.approx((14 / 16 + 15 / 16) / 2)
    assert mean["dice"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert mean["dice_std"] == pytest.approx(abs(2 / 3 - 0.5) / 2)
    # IoU over classes 0..2 per case: case 0 (12/14, 1/2, NaN), case 1 (11/12: the class-2 voxel is true background, 1, 0)
    assert mean["mean_iou"] == pytest.approx(((12 / 14 + 0.5) / 2 + (11 / 12 + 1 + 0) / 3) / 2)
    assert mean["hd95"] == pytest.approx((1.0 + 0.0) / 2) and mean["hd95_undefined"] == 1
    assert s["cases"] == 2


def test_distribution_metrics_by_hand():
    x = torch.full((2, 1, 12, 12), 0.2)
    x[0, :, 6:], x[1, :, :, 6:] = 0.7, 0.7  # half of each image in each of 2 bins of [0, 1]
    head = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    pixels = lambda images: images.flatten(1)  # noqa: E731  (features: the pixel values)
    d = distribution_metrics(x, head, x, x, head, bins=2, truth=x, truth_heads=head, extractor=pixels)
    # the same image as the reference: Bhattacharyya 0, NMI 2 (one image determines the other), Frechet 0, MAE 0, SSIM 1
    assert d["frechet"] == pytest.approx(0.0, abs=1e-4) and d["simplified_frechet"] == pytest.approx(0.0, abs=1e-9)
    assert d["bhattacharyya"] == pytest.approx(0.0, abs=1e-12)
    assert d["nmi"] == pytest.approx(2.0)
    assert d["mae"] == 0.0 and d["ssim"] == pytest.approx(1.0)
    y = torch.full((2, 1, 12, 12), 0.7)
    y[:, :, :6, :6] = 0.2  # a quarter below 0.5
    # histograms on 2 bins of [0, 1]: x (1/2, 1/2), y (1/4, 3/4): -ln(sqrt(1/8) + sqrt(3/8))
    d = distribution_metrics(x, head, x, y, head, bins=2)
    assert d["bhattacharyya"] == pytest.approx(-math.log(math.sqrt(1 / 8) + math.sqrt(3 / 8)))
    assert "mae" not in d
    assert d["frechet"] is None  # the default features need 16 pixels per axis: not applicable to 12 x 12


def test_translate_methods_compose_as_documented():
    t = build_translator(2, 1, sampler_steps=2, seed=1).eval()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = translate_methods(t, x, seed=5)
    assert list(out) == [m for m in METHODS if m != "DDIB"]
    assert out["no translation"].image is x and out["no translation"].deformation is None
    assert out["plasticine, phi = identity"].deformation is None
    full = t.translate(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out["plasticine, traced"].image, full.image)
    torch.testing.assert_close(out["plasticine, traced"].deformation.forward, full.deformation.forward)
    identity = t.replace(registration=IdentityRegistration())
    torch.testing.assert_close(out["plasticine, phi = identity"].image, identity.translate(x, generator=torch.Generator().manual_seed(5)).image)
    warped = full.deformation.to_target(x)
    torch.testing.assert_close(out["register, then translate"].image, identity.translate(warped, generator=torch.Generator().manual_seed(5)).image)
    # with the identity registration, "register, then translate" is the phi = identity baseline
    same = translate_methods(identity, x, seed=5)
    torch.testing.assert_close(same["register, then translate"].image, same["plasticine, phi = identity"].image)

    class Half(torch.nn.Module):
        def forward(self, y):
            return 0.5 * y

    with_ddib = translate_methods(t, x, seed=5, ddib=Half())  # DDIB works in the images' own units
    torch.testing.assert_close(with_ddib["DDIB"].image, 0.5 * x)
    assert list(with_ddib) == list(METHODS)


def test_settings_refuse_bad_values():
    for bad in (dict(segmentation_steps=0), dict(ddib_steps=-1), dict(value_range=(1.0, 0.0)), dict(spacing=(1.0, 0.0)), dict(learning_rate=0.0)):
        with pytest.raises(ValueError, match="EvaluationSettings"):
            EvaluationSettings(**bad)


# -- the command ----------------------------------------------------------------------------------
def _disk(n: int, g: torch.Generator, inverted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    cy, cx = (12 + 2 * torch.randn(2, generator=g)).tolist()
    r = 7 + 2 * float(torch.rand(1, generator=g))
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    head, inner = d2 < r * r, d2 < (r / 2) ** 2
    image = (0.8 * head - 0.5 * inner) if inverted else (0.3 * head + 0.6 * inner)
    image = image.float() + 0.02 * torch.rand(24, 24, generator=g)
    return image[None], (head.long() + inner.long())[None]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for i in range(4):
        for side, inverted, store in (("src", False, xs), ("tgt", True, ys)):
            image, labels = _disk(i, g, inverted)
            write_image(root / side / f"{side}{i}.png", image)
            write_image(root / f"{side}_labels" / f"{side}{i}_labels.png", labels / 255.0)  # raw PNG values 0, 1, 2
            store.append(image)
    t = build_translator(2, 1, sampler_steps=2, seed=0)
    train_translator(t, torch.stack(xs), torch.stack(ys), TrainingRecipe(diffusion_steps=2, registration_steps=2, batch_size=2, checkpoint_every=0, progress="none"))
    save_component(t, root / "model.pt")
    return root


def _args(root, out, *extra):
    return [
        "--threads", "1", "evaluate",
        "--source", str(root / "src"), "--source-labels", str(root / "src_labels"),
        "--target", str(root / "tgt"), "--target-labels", str(root / "tgt_labels"),
        "--model", str(root / "model.pt"), "--output", str(out),
        "--segmentation-steps", "3", "--segmentation-width", "4", "--segmentation-depth", "2", "--batch-size", "2", "--quiet",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(data):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    out = data / "out"
    extra = ["--ddib-steps", "2", "--ddib-sampler-steps", "2", "--spacing", "2", "1.5", "--truth", str(data / "tgt"), "--save-segmentation", str(data / "seg.pt")]
    assert main(_args(data, out, *extra)) == 0
    return out


def test_evaluate_writes_every_file(run, capsys):
    doc = json.loads((run / "evaluation.json").read_text())
    assert list(doc["methods"]) == list(METHODS)
    assert doc["seeds"] == {"segmentation": 10, "translation_of_case_0": 20, "ddib_source": 30, "ddib_target": 31}
    assert doc["num_classes"] == 3 and doc["cases"] == [f"src{i}" for i in range(4)]
    assert doc["segmentation"]["trained"] and doc["segmentation"]["steps"] == 3
    assert sorted(p.name for p in (run / "figures").iterdir()) == [f"src{i}.png" for i in range(4)]
    assert all((run / "figures" / f"src{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for i in range(4))
    rows = list(csv.DictReader((run / "table1.csv").open()))
    assert len(rows) == len(METHODS) * 4  # a mean row and three classes per method
    for row in rows:
        m = doc["methods"][row["method"]]["table"]
        ref = m["mean"] if row["class"] == "mean" else m["per_class"][row["class"]]
        for col, key in (("dice", "dice"), ("iou", "mean_iou" if row["class"] == "mean" else "iou"), ("hd95_mm", "hd95_mm")):
            assert (row[col] == "" and ref[key] is None) or float(row[col]) == ref[key]
    dist = {r["method"]: r for r in csv.DictReader((run / "distribution.csv").open())}
    assert set(dist) == set(METHODS) and {"bhattacharyya", "nmi", "frechet", "simplified_frechet", "mae", "psnr", "ssim"} <= set(dist["DDIB"])
    assert not list(run.glob("*.tmp*"))


def test_evaluate_numbers_equal_the_metrics_recomputed(data, run):
    doc = json.loads((run / "evaluation.json").read_text())
    translator = load_translator(data / "model.pt").eval()
    seg = load_component(data / "seg.pt", expected=SegmentationUNet).eval()
    xs = ImageFolder(data / "src").stack()
    ys = ImageFolder(data / "tgt").stack()
    xl = ImageFolder(data / "src_labels", normalization="none").stack().round().long()
    dices, ious, hds = [], [], []
    identity = translator.replace(registration=IdentityRegistration())
    for i in range(4):
        x = xs[i : i + 1]
        r = translator.translate(x, generator=torch.Generator().manual_seed(20 + i))
        back = r.deformation.labels_to_source(seg(r.image).argmax(1, keepdim=True), 3)
        dices.append(dice(back, xl[i : i + 1], 3, empty="nan")[0])
        ious.append(iou(back, xl[i : i + 1], 3, empty="nan")[0])
        hds.append(hausdorff95(back, xl[i : i + 1], 3, spacing=(2.0, 1.5))[0])
        ident = identity.translate(x, generator=torch.Generator().manual_seed(20 + i)).image
        assert doc["methods"]["plasticine, phi = identity"]["per_case"]["dice"][i] == pytest.approx(dice(segment(seg, ident), xl[i : i + 1], 3, empty="nan")[0].tolist(), nan_ok=True)
    dices, ious, hds = torch.stack(dices), torch.stack(ious), torch.stack(hds)
    table = doc["methods"]["plasticine, traced"]["table"]
    assert table["per_class"]["1"]["dice"] == pytest.approx(float(np.nanmean(dices[:, 1].numpy())))
    assert table["mean"]["dice"] == pytest.approx(float(np.mean([np.nanmean(d[1:].numpy()) for d in dices])))
    assert table["mean"]["mean_iou"] == pytest.approx(float(np.mean([np.nanmean(d.numpy()) for d in ious])))
    h = hds[:, 1:].numpy()
    h = np.where(np.isfinite(h), h, np.nan)  # a class in one mask only: undefined, counted apart
    per_case = [np.nanmean(row) for row in h if np.isfinite(row).any()]
    assert table["mean"]["hd95_mm"] == (pytest.approx(float(np.mean(per_case))) if per_case else None)
    assert table["mean"]["hd95_undefined"] == int(np.isinf(hds[:, 1:].numpy()).sum())
    # the no-translation row: the sources themselves, segmented
    nt = doc["methods"]["no translation"]
    assert nt["per_case"]["pixel_accuracy"] == pytest.approx(((segment(seg, xs) == xl).double().flatten(1).mean(1)).tolist())
    # its distribution metrics: the source heads against the target heads, and MAE against the given truth
    sh, th = head_extractor()(xs)[:, 1:2] > 0.5, head_extractor()(ys)[:, 1:2] > 0.5
    expect = bhattacharyya_distance(intensity_histogram(xs[sh].numpy(), 64), intensity_histogram(ys[th].numpy(), 64))
    assert nt["distribution"]["bhattacharyya"] == pytest.approx(expect)
    assert nt["distribution"]["mae"] == pytest.approx(float(mae(xs, ys, th).mean()))


def test_evaluate_loads_a_segmentation_network(data, run, tmp_path):
    first = json.loads((run / "evaluation.json").read_text())
    out = tmp_path / "again"
    assert main(_args(data, out, "--segmentation", str(data / "seg.pt"), "--no-ddib", "--no-figures")) == 0
    doc = json.loads((out / "evaluation.json").read_text())
    assert "DDIB" not in doc["methods"] and not doc["segmentation"]["trained"] and doc["ddib"] is None
    assert not (out / "figures").exists()
    for name in ("no translation", "plasticine, traced"):
        assert doc["methods"][name]["per_case"]["dice"] == first["methods"][name]["per_case"]["dice"]


def _error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("plasticine evaluate: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_evaluate_refuses_bad_input(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bad"
    few = tmp_path / "few"
    few.mkdir()
    (few / "src0_labels.png").write_bytes((data / "src_labels" / "src0_labels.png").read_bytes())
    fewer = [str(few) if a == str(data / "src_labels") else a for a in _args(data, out, "--no-figures")]
    assert "--source-labels" in (err := _error(capsys, fewer)) and "1 label image(s) for 4 image(s)" in err
    assert "--classes: expected an integer >= 2" in _error(capsys, _args(data, out, "--no-figures", "--classes", "1"))
    assert "--source-labels: labels up to 2, but 2 classes" in _error(capsys, _args(data, out, "--no-figures", "--classes", "2"))
    assert "--spacing: expected 2 voxel sizes" in _error(capsys, _args(data, out, "--no-figures", "--spacing", "1"))
    assert "--ddib-steps: expected a positive integer" in _error(capsys, _args(data, out, "--no-figures", "--ddib-steps", "0"))
    wrong = tmp_path / "wrong.pt"
    save_component(SegmentationUNet(1, 5, 2), wrong)
    assert "5 classes" in _error(capsys, _args(data, out, "--no-figures", "--no-ddib", "--segmentation", str(wrong)))
    small = tmp_path / "small"
    write_image(small / "t0.png", torch.rand(1, 20, 24))
    assert "--truth: 1 image(s)" in _error(capsys, _args(data, out, "--no-figures", "--no-ddib", "--truth", str(small)))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert "matplotlib" in _error(capsys, _args(data, out))
    assert not out.exists()  # nothing written before the inputs were checked



def test_translation_figure_2d_and_3d(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    from plasticine.core import Deformation
    from plasticine.evaluation import translation_figure

    for shape in ((20, 18), (6, 20, 18)):
        n = len(shape)
        u = 0.5 * torch.randn(1, n, *shape, generator=torch.Generator().manual_seed(n))
        d = Deformation(forward=u, inverse=-u)
        labels = torch.randint(0, 3, (1, *shape), generator=torch.Generator().manual_seed(0))
        path = translation_figure(tmp_path / f"f{n}.png", torch.rand(1, *shape), d, torch.rand(1, *shape), labels, source_labels=labels, title="t")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f2.png", "f3.png"]  # no temporary left


def test_train_ddib_builds_two_condition_free_models_of_the_denoisers_architecture():
    from plasticine.diffusion import DDIBTranslator
    from plasticine.evaluation import DDIBBaseline, train_ddib

    t = build_translator(2, 1, sampler_steps=2, seed=0).eval()
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    settings = EvaluationSettings(ddib_steps=1, ddib_sampler_steps=2, batch_size=2, progress=False)
    ddib = train_ddib(t, x, 1 - x, settings)
    assert isinstance(ddib, DDIBBaseline) and isinstance(ddib.bridge, DDIBTranslator) and ddib.steps == 2
    assert ddib.bridge.prediction == "x0" and ddib.bridge.clip == (-1.0, 1.0) and ddib.data_range == t.data_range
    for model in (ddib.bridge.source_denoiser, ddib.bridge.target_denoiser):
        assert model.settings.cond_channels == 0 and model.settings.base_channels == t.denoiser.settings.base_channels
    assert not torch.equal(next(ddib.bridge.source_denoiser.parameters()), next(ddib.bridge.target_denoiser.parameters()))
    again = train_ddib(t, x, 1 - x, settings)  # seeded: the same weights
    assert all(torch.equal(a, b) for a, b in zip(ddib.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="fewer than the batch size"):
        train_ddib(t, x[:1], x, settings)
    with pytest.raises(ValueError, match="ddib_steps"):
        train_ddib(t, x, x, EvaluationSettings(ddib_steps=0))


@pytest.mark.parametrize("data_range, value_range", [(None, (0.0, 1.0)), (None, (-1.0, 3.0)), ((0.0, 2.0), (0.0, 1.0))])
def test_ddib_decodes_inside_the_data_range(data_range, value_range):
    # an eps-parametrised, unclipped translator on raw intensities (the demo's kind) does not pass
    # its parametrisation on: DDIB predicts x0 on the data range mapped to [-1, 1] and clips there
    from plasticine.evaluation import train_ddib

    t = build_translator(2, 1, prediction="eps", data_range=data_range, clip=False, sampler_steps=2, seed=0).eval()
    low, high = data_range if data_range is not None else value_range
    g = torch.Generator().manual_seed(1)
    x = low + (high - low) * torch.rand(4, 1, 16, 16, generator=g)
    ddib = train_ddib(t, x, x.flip(-1), EvaluationSettings(ddib_steps=1, ddib_sampler_steps=3, batch_size=2, value_range=value_range, progress=False))
    assert ddib.data_range == (low, high)
    wild = torch.cat([x, low + (high - low) * (0.5 + 3 * torch.randn(2, 1, 16, 16, generator=g))])  # also inputs far outside the range
    with torch.no_grad():
        out = ddib(wild)
    assert torch.isfinite(out).all() and out.min() >= low and out.max() <= high
    assert out.std() > 0  # not a constant at a bound


def test_ddib_on_one_domain_both_sides_approximately_reconstructs():
    # the oracle: source and target models trained on the same images; the bridge is then close to
    # the identity, and with one model both ways closer still (only the discretisation is left)
    from plasticine.diffusion import DDIBTranslator
    from plasticine.evaluation import DDIBBaseline, train_ddib

    t = build_translator(2, 1, prediction="eps", data_range=None, clip=False, sampler_steps=2, seed=0).eval()
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    c = 4 + 8 * torch.rand(8, 2, generator=torch.Generator().manual_seed(0))
    x = torch.exp(-((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) / 18)[:, None]
    ddib = train_ddib(t, x, x, EvaluationSettings(ddib_steps=30, ddib_sampler_steps=10, batch_size=4, progress=False))
    model = ddib.bridge.source_denoiser
    same = DDIBBaseline(DDIBTranslator(model, model, t.schedule, 10, prediction="x0", clip=(-1.0, 1.0)), ddib.data_range)
    with torch.no_grad():
        two, one = ddib(x), same(x)
    chance = float((x - x.mean(0, keepdim=True)).abs().mean())  # the error of the mean image
    assert float(mae(two, x).mean()) < 0.75 * chance
    assert float(mae(one, x).mean()) < 0.4 * chance


def test_ddib_baseline_rejects_bad_arguments():
    from plasticine.evaluation import DDIBBaseline

    with pytest.raises(ValueError, match="bridge: expected a DDIBTranslator"):
        DDIBBaseline(torch.nn.Identity(), (0.0, 1.0))
    from plasticine.diffusion import DDIBTranslator, LinearSchedule

    bridge = DDIBTranslator(lambda y, g, c: y, lambda y, g, c: y, LinearSchedule(num_steps=10), 2, prediction="x0")
    for bad in ((1.0, 0.0), None, (0.0, float("inf"))):
        with pytest.raises(ValueError, match="data_range"):
            DDIBBaseline(bridge, bad)
