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
        assert all(re.fullmatch(r"[\d.]+", c) for c in cells), row
    # The arms' layers were built with what each arm names.
    config = {p.parent.name: json.loads(p.read_text())["config"] for p in tmp_path.glob("*/result.json")}
    assert config["spectral_norm_seed0"]["spectral_norm"] and not config["implicit_seed0"]["spectral_norm"]
    assert (config["forward_inverse__k_2_seed0"]["b_init"], config["forward_inverse__k_2_seed0"]["b_refine_steps"]) \
        == ("forward_inverse", 2)
    assert config["fp_correction__3_states_seed0"]["fp_correction_states"] == 3
    assert {c["f_solver"] for c in config.values()} == {"broyden"}
