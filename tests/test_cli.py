"""The command line on small inputs: train (and resume), translate, trace, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_generator, record_calls

from plasticine.checkpoint import load_state
from plasticine.cli import main
from plasticine.core import Deformation, sample_at_points
from plasticine.io import read_deformation, read_image, read_points, write_deformation, write_image

pytest.importorskip("PIL.Image", reason="the io extra (pillow) is not installed")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    g = make_generator(0)
    for i in range(4):
        x = torch.rand(1, 16, 12, generator=g)
        write_image(root / "src" / f"a{i}.png", x)
        write_image(root / "tgt" / f"b{i}.png", 1.0 - x)
    return root


@pytest.fixture(scope="module")
def model(folders):
    out = folders / "model.pt"
    args = ["--threads", "1", "train", "--source", str(folders / "src"), "--target", str(folders / "tgt"), "--output", str(out)]
    assert main(args + ["--diffusion-steps", "2", "--registration-steps", "2", "--batch-size", "2", "--quiet"]) == 0
    return out


def test_train_writes_a_model_and_resumes(folders, model):
    assert model.is_file()
    dm, reg = load_state(f"{model}.diffusion-state.pt"), load_state(f"{model}.registration-state.pt")
    assert dm["step"] == 2 and reg["step"] == 2
    # running again with more steps continues both stages from their checkpoints
    out = folders / "model.pt"
    args = ["train", "--source", str(folders / "src"), "--target", str(folders / "tgt"), "--output", str(folders / "more.pt")]
    for suffix in (".diffusion-state.pt", ".registration-state.pt"):
        (folders / f"more.pt{suffix}").write_bytes((folders / f"model.pt{suffix}").read_bytes())
    assert main(args + ["--diffusion-steps", "3", "--registration-steps", "2", "--batch-size", "2", "--quiet"]) == 0
    dm3 = load_state(folders / "more.pt.diffusion-state.pt")
    assert dm3["step"] == 3
    assert any(not torch.equal(dm3["model"][k], v) for k, v in dm["model"].items())  # one more step changed the denoiser
    # the registration stage was complete: its weights are those of the first run
    reg2 = load_state(folders / "more.pt.registration-state.pt")
    assert all(torch.equal(reg2["model"][k], v) for k, v in reg["model"].items())
    assert out.is_file()


def test_translate_writes_images_deformations_and_traces(folders, model, tmp_path):
    pts = tmp_path / "p.json"
    pts.write_text(json.dumps([[3.0, 4.0], [10.5, 7.25]]))
    out = tmp_path / "out"
    assert main(["translate", "--model", str(model), "--input", str(folders / "src"), "--output", str(out), "--start-step", "20", "--points", str(pts)]) == 0
    for i in range(4):
        img = read_image(out / f"a{i}_translated.png", normalization="none")
        assert img.shape == (1, 16, 12)
        d = read_deformation(out / f"a{i}_deformation.npz")
        assert d.forward.shape == (1, 2, 16, 12)
        doc = json.loads((out / f"a{i}_trace.json").read_text())
        assert doc["start_step"] == 20 and doc["deformation"] == f"a{i}_deformation.npz" and doc["seed"] == i
        # the trace file holds phi^-1(p) of the written deformation
        expected = torch.tensor([[3.0, 4.0], [10.5, 7.25]]) + sample_at_points(d.inverse, torch.tensor([[[3.0, 4.0], [10.5, 7.25]]]))[0]
        torch.testing.assert_close(read_points(out / f"a{i}_trace.json", which="target"), expected)


def test_trace_points_and_masks_through_a_known_shift(tmp_path):
    pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")
    # phi(p) = p + (0, 2): the target column c shows source column c + 2
    u = torch.zeros(1, 2, 10, 9)
    u[:, 1] = 2.0
    write_deformation(tmp_path / "d.npz", Deformation(u, -u))
    mask = torch.zeros(1, 10, 9)
    mask[:, 3:6, 4:7] = 1.0
    write_image(tmp_path / "m.png", mask)
    assert main(["trace", "--deformation", str(tmp_path / "d.npz"), "--mask", str(tmp_path / "m.png"), "--output", str(tmp_path / "t.png")]) == 0
    traced = read_image(tmp_path / "t.png", normalization="none")[0]
    expected = np.zeros((10, 9))
    expected[3:6, 2:5] = 255
    np.testing.assert_array_equal(traced.numpy(), expected)
    assert main(["trace", "--deformation", str(tmp_path / "d.npz"), "--mask", str(tmp_path / "t.png"), "--direction", "to-source", "--output", str(tmp_path / "back.nii.gz")]) == 0
    back = read_image(tmp_path / "back.nii.gz", normalization="none")[0]
    np.testing.assert_array_equal(back.numpy(), mask[0].numpy() * 255)
    (tmp_path / "p.csv").write_text("1,5\n2,6.5\n")
    assert main(["trace", "--deformation", str(tmp_path / "d.npz"), "--points", str(tmp_path / "p.csv"), "--output", str(tmp_path / "p.json")]) == 0
    assert read_points(tmp_path / "p.json", which="target").tolist() == [[1.0, 3.0], [2.0, 4.5]]
    assert main(["trace", "--deformation", str(tmp_path / "d.npz"), "--points", str(tmp_path / "p.json"), "--direction", "to-source", "--output", str(tmp_path / "q.json")]) == 0
    assert read_points(tmp_path / "q.json", which="source").tolist() == [[1.0, 5.0], [2.0, 6.5]]


def test_bad_inputs_exit_1_with_one_line(folders, model, tmp_path, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    cases = [
        (["translate", "--model", str(model), "--input", str(bad), "--output", str(tmp_path / "o")], "broken.png"),
        (["translate", "--model", str(tmp_path / "none.pt"), "--input", str(folders / "src"), "--output", str(tmp_path / "o")], "none.pt"),
        (["trace", "--deformation", str(tmp_path / "none.npz"), "--points", str(tmp_path / "p.json"), "--output", str(tmp_path / "x.json")], "none.npz"),
        (["train", "--source", str(folders / "src"), "--target", str(bad), "--output", str(tmp_path / "m.pt")], "broken.png"),
        (["demo", "--diffusion-steps", "3"], "--retrain"),
    ]
    for argv, needle in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as info:
        main(["translate", "--model", str(model)])
    assert info.value.code == 2


def test_python_dash_m_runs():
    out = subprocess.run([sys.executable, "-m", "plasticine", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "translate" in out.stdout and "demo" in out.stdout
    out = subprocess.run([sys.executable, "-m", "plasticine", "trace", "--deformation", "nothing.npz", "--points", "p.json", "--output", "o.json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "nothing.npz" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", ["train", "translate", "trace", "demo"])
def test_help_shows_defaults_and_threads(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--threads" in out and "--debug" in out
    # --threads states its default, the number of threads torch uses here
    assert f"(default: torch's choice, {torch.get_num_threads()} on this machine)" in " ".join(out.split())
    expected = {"train": "(default: 2000)", "translate": "(default: npz)", "trace": "(default: to-target)", "demo": "(default: plasticine-demo)"}
    assert expected[command] in " ".join(out.split())


def test_threads_after_the_subcommand(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["trace", "--threads", "1", "--deformation", str(tmp_path / "none.npz"), "--points", "p.json", "--output", str(tmp_path / "o.json")]) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "none.npz" in capsys.readouterr().err


def test_train_refuses_bad_options_before_any_work(folders, tmp_path, capsys):
    base = ["train", "--source", str(folders / "src"), "--target", str(folders / "tgt"), "--diffusion-steps", "1", "--registration-steps", "1", "--batch-size", "2", "--quiet"]
    cases = [
        (["--output", str(tmp_path / "m.npz")], "m.npz"),
        (["--output", str(tmp_path / "m.pt"), "--lr", "nan"], "--lr"),
        (["--output", str(tmp_path / "m.pt"), "--start-fraction", "1.5"], "--start-fraction"),
        (["--output", str(tmp_path / "m.pt"), "--device", "tpu"], "--device"),
    ]
    for extra, needle in cases:
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert not list(tmp_path.iterdir()), f"{extra}: files were written before the error: {list(tmp_path.iterdir())}"


def test_translate_refuses_inputs_whose_outputs_share_a_name(model, tmp_path, capsys):
    pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")
    inputs = tmp_path / "in"
    x = torch.rand(1, 16, 12, generator=make_generator(3))
    write_image(inputs / "scan.png", x)
    write_image(inputs / "scan.nii.gz", x[0][None])
    out = tmp_path / "out"
    assert main(["translate", "--model", str(model), "--input", str(inputs), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "scan.png" in err and "scan.nii.gz" in err and err.count("\n") == 1, err
    assert not out.exists() or not list(out.iterdir())


def test_trace_output_must_fit_what_is_traced(tmp_path, capsys):
    u = torch.zeros(1, 2, 6, 5)
    write_deformation(tmp_path / "d.npz", Deformation(u, -u))
    (tmp_path / "p.csv").write_text("1,2\n")
    assert main(["trace", "--deformation", str(tmp_path / "d.npz"), "--points", str(tmp_path / "p.csv"), "--output", str(tmp_path / "x.png")]) == 1
    assert ".json" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    write_image(tmp_path / "m.png", torch.zeros(1, 6, 5))
    assert main(["trace", "--deformation", str(tmp_path / "d.npz"), "--mask", str(tmp_path / "m.png"), "--output", str(tmp_path / "x.json")]) == 1
    assert ".png" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("error", [KeyError("points"), TypeError("list indices must be integers"), MemoryError("Unable to allocate 22.4 GiB")])
def test_unexpected_errors_are_one_line_and_debug_shows_them(monkeypatch, capsys, error):
    import plasticine.cli as cli

    def broken(args):
        raise error

    monkeypatch.setitem(cli._COMMANDS, "trace", broken)
    argv = ["trace", "--deformation", "d.npz", "--points", "p.json", "--output", "o.json"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(error.args[0]) in err
    assert ("out of memory" in err) if isinstance(error, MemoryError) else (type(error).__name__ in err and "--debug" in err)
    with pytest.raises(type(error)):
        main(argv + ["--debug"])


def test_training_log_names_each_stage(folders, tmp_path, capsys):
    args = ["train", "--source", str(folders / "src"), "--target", str(folders / "tgt"), "--output", str(tmp_path / "m.pt")]
    assert main(args + ["--diffusion-steps", "1", "--registration-steps", "1", "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "denoiser" in err and "registration" in err, err


def test_resume_refuses_a_changed_learning_rate(folders, model, tmp_path, capsys):
    for suffix in (".diffusion-state.pt", ".registration-state.pt"):
        (tmp_path / f"m.pt{suffix}").write_bytes((folders / f"model.pt{suffix}").read_bytes())
    args = ["train", "--source", str(folders / "src"), "--target", str(folders / "tgt"), "--output", str(tmp_path / "m.pt")]
    assert main(args + ["--diffusion-steps", "3", "--registration-steps", "2", "--batch-size", "2", "--quiet", "--lr", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "lr" in err and "0.001" in err and "0.5" in err and err.count("\n") == 1, err


def test_translate_refuses_a_non_finite_result(folders, model, tmp_path, capsys, monkeypatch):
    from plasticine.registration.network import RegistrationNet

    forward = RegistrationNet.forward

    def diverged(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out._replace(velocity=out.velocity * float("nan"), inverse_velocity=out.inverse_velocity * float("nan"))

    monkeypatch.setattr(RegistrationNet, "forward", diverged)
    out = tmp_path / "out"
    assert main(["translate", "--model", str(model), "--input", str(folders / "src" / "a0.png"), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "a0.png" in err and "non-finite" in err and err.count("\n") == 1, err
    assert not list(out.glob("*_deformation.*")) and not list(out.glob("*_translated.*"))


def test_a_checkpoint_with_an_absurd_setting_is_a_one_line_error(folders, model, tmp_path, capsys):
    from plasticine.checkpoint import load_tensors, save_tensors

    tensors, config = load_tensors(model)

    def absurd(node):
        if isinstance(node, dict):
            return {k: 3_000_000_000 if k == "num_steps" else absurd(v) for k, v in node.items()}
        return [absurd(v) for v in node] if isinstance(node, list) else node

    changed = absurd(config)
    assert changed != config, "the checkpoint config holds no num_steps"
    save_tensors(tmp_path / "absurd.pt", tensors, changed)
    assert main(["translate", "--model", str(tmp_path / "absurd.pt"), "--input", str(folders / "src"), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "absurd.pt" in err and "num_steps" in err and "3000000000" in err and err.count("\n") == 1, err


def _train_args(folders, out):
    return ["train", "--source", str(folders / "src"), "--target", str(folders / "tgt"), "--output", str(out), "--diffusion-steps", "2", "--registration-steps", "2", "--batch-size", "2", "--quiet"]


def test_the_default_model_is_the_default_recipe(model):
    from plasticine.checkpoint import load_translator
    from plasticine.recipes import build_translator
    from plasticine.segmentation import ForegroundExtractor

    t = load_translator(model)
    assert isinstance(t.structure, ForegroundExtractor) and t.structure.config == build_translator(2, 1).structure.config
    assert t.sampler.config["prediction"] == "x0" and t.sampler.config["clip"] == (-1.0, 1.0)
    assert t.data_range == (0.0, 1.0) and t.start == "warped" and t.start_fraction == 1.0


def test_train_options_reach_the_translator_and_the_recipe(folders, tmp_path, monkeypatch, capsys):
    from plasticine import recipes
    from plasticine.checkpoint import load_translator
    from plasticine.segmentation import KMeansExtractor
    from plasticine.training import Augmentation, ContrastRandomization

    calls = record_calls(monkeypatch, recipes, "train_translator")
    out = tmp_path / "m.pt"
    extra = ["--structure", "kmeans", "--classes", "3", "--prediction", "v", "--data-range", "-1", "2", "--no-clip", "--start", "source", "--start-fraction", "0.25"]
    extra += ["--sampler-steps", "3", "--ema-decay", "0.5", "--augment", "--snr-gamma", "5", "--contrast-randomization"]
    assert main(_train_args(folders, out) + extra) == 0
    t = load_translator(out)
    assert isinstance(t.structure, KMeansExtractor) and t.structure.num_classes == 3 and t.conditioning.config["num_labels"] == 3
    assert t.sampler.config["prediction"] == "v" and t.sampler.config["clip"] is None and t.sampler.config["steps"] == 3
    assert t.data_range == (-1.0, 2.0) and t.start == "source" and t.start_fraction == 0.25
    ((args, _),) = calls
    recipe = args[3]
    assert recipe.ema_decay == 0.5 and recipe.augmentation == Augmentation() and recipe.snr_gamma == 5.0
    assert recipe.contrast == ContrastRandomization()
    # the losses are printed and written beside the model, with the settings used
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        stage, _, terms = line.removeprefix("final ").partition(" loss: ")
        printed[stage] = {name: float(v) for name, v in (term.rsplit(" ", 1) for term in terms.split(", "))}
    doc = json.loads((tmp_path / "m.losses.json").read_text())
    assert set(doc["losses"]) == set(printed) == {"denoiser", "registration"}
    for stage, terms in doc["losses"].items():
        assert terms and set(terms) == set(printed[stage]) and all(np.isfinite(v) for v in terms.values())
        for name, value in terms.items():
            assert printed[stage][name] == pytest.approx(value, rel=1e-5, abs=1e-12)
    s = doc["settings"]
    assert (s["structure"], s["classes"], s["prediction"], s["data_range"], s["clip"], s["start"]) == ("kmeans", 3, "v", [-1.0, 2.0], False, "source")
    assert (s["ema_decay"], s["augment"], s["snr_gamma"], s["diffusion_steps"]) == (0.5, True, 5.0, 2)
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file of the atomic write was left behind"


def test_train_without_a_data_range(folders, tmp_path):
    from plasticine.checkpoint import load_translator

    out = tmp_path / "m.pt"
    assert main(_train_args(folders, out) + ["--no-data-range", "--structure", "foreground", "--sampler-steps", "2"]) == 0
    t = load_translator(out)
    assert t.data_range is None and t.conditioning.config["num_labels"] == 2
    assert json.loads((tmp_path / "m.losses.json").read_text())["settings"]["data_range"] is None


def test_new_train_options_are_refused_before_any_work(folders, tmp_path, capsys):
    cases = [
        (["--mind-sigma", "0"], "--mind-sigma"),
        (["--ema-decay", "1"], "--ema-decay"),
        (["--snr-gamma", "-1"], "--snr-gamma"),
        (["--snr-gamma", "nan"], "--snr-gamma"),
        (["--data-range", "1", "0"], "--data-range"),
        (["--data-range", "0", "inf"], "--data-range"),
        (["--data-range", "0", "1", "--no-data-range"], "--no-data-range"),
        (["--start-fraction", "0"], "--start-fraction"),
    ]
    for extra, needle in cases:
        assert main(_train_args(folders, tmp_path / "m.pt") + extra) == 1
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert not list(tmp_path.iterdir()), f"{extra}: files were written before the error: {list(tmp_path.iterdir())}"
    for extra in (["--structure", "otsu"], ["--prediction", "score"], ["--start", "target"]):
        with pytest.raises(SystemExit) as info:
            main(_train_args(folders, tmp_path / "m.pt") + extra)
        assert info.value.code == 2 and extra[0] in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_translate_writes_the_float_translation_as_nifti(folders, model, tmp_path):
    nib = pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")
    from plasticine.checkpoint import load_translator
    from plasticine.io import ImageFolder

    out = tmp_path / "out"
    assert main(["translate", "--model", str(model), "--input", str(folders / "src"), "--output", str(out), "--seed", "7"]) == 0
    images = ImageFolder(folders / "src")
    t = load_translator(model)
    for i in range(len(images)):
        expected = t.translate(images[i][None], generator=torch.Generator().manual_seed(7 + i)).image[0, 0]
        name = images.name(i)
        data = np.asarray(nib.load(out / f"{name}_translated.nii.gz").dataobj)
        assert data.dtype == np.float32 and data.shape == tuple(expected.shape)
        np.testing.assert_array_equal(data, expected.numpy())
        # the 8-bit preview is the translation clipped to [0, 1] (the count is in the trace file)
        png = read_image(out / f"{name}_translated.png", normalization="none")[0]
        np.testing.assert_array_equal(png.numpy(), np.round(255 * expected.clamp(0, 1).numpy().astype(np.float64)))
        doc = json.loads((out / f"{name}_trace.json").read_text())
        assert doc["translated"] == f"{name}_translated.nii.gz" and doc["preview"] == f"{name}_translated.png"
        assert doc["clipped_values"] == int(((expected < 0) | (expected > 1)).sum()) and doc["registration"] == "model"


def test_translate_without_registration_uses_the_identity(folders, model, tmp_path):
    pts = tmp_path / "p.json"
    pts.write_text(json.dumps([[3.0, 4.0], [10.5, 7.25]]))
    out = tmp_path / "out"
    assert main(["translate", "--model", str(model), "--input", str(folders / "src" / "a1.png"), "--output", str(out), "--no-registration", "--points", str(pts)]) == 0
    d = read_deformation(out / "a1_deformation.npz")
    assert d.forward.shape == (1, 2, 16, 12) and not d.forward.any() and not d.inverse.any()
    torch.testing.assert_close(read_points(out / "a1_trace.json", which="target"), torch.tensor([[3.0, 4.0], [10.5, 7.25]]))
    assert json.loads((out / "a1_trace.json").read_text())["registration"] == "identity"
    # with the model's registration the deformation is not the identity
    with_reg = tmp_path / "with"
    assert main(["translate", "--model", str(model), "--input", str(folders / "src" / "a1.png"), "--output", str(with_reg)]) == 0
    assert read_deformation(with_reg / "a1_deformation.npz").forward.abs().max() > 0


def test_translate_without_nibabel_writes_the_preview_and_says_so(folders, model, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nibabel" else find_spec(name, *a))
    out = tmp_path / "out"
    assert main(["translate", "--model", str(model), "--input", str(folders / "src"), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("nibabel is not installed") == 1, err
    assert len(list(out.glob("*_translated.png"))) == 4 and not list(out.glob("*.nii.gz"))
    assert json.loads((out / "a0_trace.json").read_text())["translated"] == "a0_translated.png"


def test_values_outside_the_preview_range_are_kept_in_the_nifti_and_counted(folders, model, tmp_path, monkeypatch, capsys):
    import dataclasses

    nib = pytest.importorskip("nibabel", reason="the io extra (nibabel) is not installed")
    from plasticine.translator import TraceableTranslator

    translate = TraceableTranslator.translate
    results = []

    def stretched(self, *args, **kwargs):
        r = translate(self, *args, **kwargs)
        r = dataclasses.replace(r, image=3.0 * r.image - 1.0)
        results.append(r.image)
        return r

    monkeypatch.setattr(TraceableTranslator, "translate", stretched)
    out = tmp_path / "out"
    assert main(["translate", "--model", str(model), "--input", str(folders / "src" / "a0.png"), "--output", str(out)]) == 0
    (y,) = results
    outside = int(((y < 0) | (y > 1)).sum())
    assert outside > 0
    err = capsys.readouterr().err
    assert f"{outside} of {y.numel()} values outside [0, 1] clipped for the 8-bit PNG preview" in err and "a0_translated.nii.gz" in err
    np.testing.assert_array_equal(np.asarray(nib.load(out / "a0_translated.nii.gz").dataobj), y[0, 0].numpy())
    assert json.loads((out / "a0_trace.json").read_text())["clipped_values"] == outside


def _blobs(root, name, centre_x, count, generator):
    """Images of one bright blob per image, centred at column ``centre_x`` (+- 0.5 per image)."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(12.0), indexing="ij")
    for i in range(count):
        cx = centre_x + float(torch.rand((), generator=generator)) - 0.5
        write_image(root / name / f"{name}{i}.png", torch.exp(-((yy - 8) ** 2 + (xx - cx) ** 2) / 8.0)[None])


def test_train_with_population_registration_fits_one_field_of_the_sets(tmp_path, capsys):
    from plasticine.checkpoint import load_translator
    from plasticine.core.warp import warp
    from plasticine.io import ImageFolder
    from plasticine.registration import PopulationRegistration

    g = make_generator(4)
    _blobs(tmp_path, "src", 4.5, 4, g)
    _blobs(tmp_path, "tgt", 7.0, 4, g)  # the systematic change: every blob moves 2.5 pixels to the right
    out = tmp_path / "m.pt"
    args = ["train", "--source", str(tmp_path / "src"), "--target", str(tmp_path / "tgt"), "--output", str(out)]
    assert main(args + ["--registration", "population", "--diffusion-steps", "2", "--batch-size", "2", "--quiet"]) == 0
    t = load_translator(out)
    assert isinstance(t.registration, PopulationRegistration) and bool(t.registration.fitted) and t.registration.shape == (16, 12)
    # the field is the registration of the mean source to the mean target: it moves the template onto the other
    xs, ys = ImageFolder(tmp_path / "src").stack(), ImageFolder(tmp_path / "tgt").stack()
    mx, my = xs.mean(0, keepdim=True), ys.mean(0, keepdim=True)
    moved = warp(mx, t.registration.forward_field)
    assert float((moved - my).pow(2).mean()) < 0.25 * float((mx - my).pow(2).mean())
    assert float(t.registration.forward_field[0, 1, 6:11, 5:9].mean()) < -1.0  # pulls from the left: x o phi moves right
    # one field for every image, also at translation
    d = t.registration.register(xs)
    assert torch.equal(d.forward[0], d.forward[3])
    doc = json.loads((tmp_path / "m.losses.json").read_text())
    assert doc["settings"]["registration"] == "population" and doc["settings"]["shape"] == [16, 12]
    assert set(doc["losses"]["registration"]) == {"max_displacement", "mean_displacement"}
    # images on different grids cannot share one field: a one-line error before anything is written
    write_image(tmp_path / "tgt" / "other.png", torch.rand(1, 16, 14, generator=g))
    bad = tmp_path / "bad.pt"
    assert main(["train", "--source", str(tmp_path / "src"), "--target", str(tmp_path / "tgt"), "--output", str(bad), "--registration", "population", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--registration population: expected every source and target image on one grid" in err and "other.png" in err and err.count("\n") == 1, err
    assert not bad.exists()
