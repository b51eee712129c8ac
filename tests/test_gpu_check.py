"""bench/gpu_check.py on CPU: its refusal without CUDA, its table and exit status, and a smoke run
of every section on small models."""
import pytest
import torch

from bench import gpu_check
from bench.gpu_check import FAIL, PASS, Row

pytestmark = pytest.mark.slow  # end-to-end runs: left out of the fast loop

def test_without_cuda_it_exits_2_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "gpu_check: CUDA is not available" in err and "--device cpu --tiny" in err
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu"])              # the full validation needs a GPU
    assert "--device cpu needs a CUDA device, or cpu together with --tiny" in capsys.readouterr().err


def test_a_failing_or_crashing_section_fails_the_run_and_the_others_still_run():
    def crash():
        raise RuntimeError("CUDA out of memory")

    rows = gpu_check.run_checks([
        ("fine", lambda: [Row("a | b", "1.0x\n(target met)", PASS)]),
        ("crash", crash),
        ("bad", lambda: [Row("loss", "nan", FAIL)]),
        ("after", lambda: [Row("still runs", "ok", PASS)]),
    ])
    assert [r.status for r in rows] == [PASS, FAIL, FAIL, PASS]
    assert rows[1] == Row("crash", "RuntimeError: CUDA out of memory", FAIL)
    table = gpu_check.render(rows)
    assert table[:2] == ["| check | result | status |", "|---|---|---|"]
    assert table[2] == "| a \\| b | 1.0x (target met) | pass |"      # one line per row, pipes escaped
    assert len(table) == 6 and gpu_check.exit_code(rows) == 1
    assert gpu_check.exit_code([rows[0], rows[3]]) == 0


@pytest.mark.filterwarnings(
    r"ignore:(?s).*(version_base|strict flag|ConfigStore schema|no longer experimental|package header):UserWarning")
def test_tiny_run_of_every_section_on_cpu(capsys, monkeypatch):
    pytest.importorskip("timm")
    pytest.importorskip("fairseq")
    # The core section's pytest run, on one short file: the suite runs the core tests itself.
    monkeypatch.setattr(gpu_check, "CORE_TESTS", ("tests/test_config.py",))
    # With oneDNN, as a user's run has it (the suite turns it off): torch's own reduced-precision
    # convolutions on CPU would make the precision section's autocast solves take minutes.
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--sections", *gpu_check.SECTIONS]) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index("| check | result | status |")
    rows = out[start + 2:]
    assert out[start - 1].startswith("gpu_check ") and "torch " in out[start - 1]
    assert rows[0].startswith("| core tests on cpu (test_config.py)") and "passed" in rows[0]
    graphs = [r for r in rows if r.startswith("| CUDA graph ")]
    assert len(graphs) == 2 and all("not captured: CUDA graphs need CUDA" in r and "repeat difference 0.0e+00" in r
                                    and "same steps True" in r for r in graphs)
    assert any(r.startswith("| train step mdeq_tiny_cifar") and "solver steps fwd" in r for r in rows)
    assert any(r.startswith("| train step deq_transformer_lm_tiny vs transformer_lm") for r in rows)
    for part in ("f (the equilibrium function)", "solver bookkeeping", "stem, head, loss and optimizer", "whole step"):
        assert any(r.startswith(f"| step profile mdeq_tiny_cifar: {part}") for r in rows), part
    assert sum(r.startswith("| JR step / plain step") for r in rows) == 2
    assert sum(r.startswith("| forward solve") and "autocast against float32" in r for r in rows) == 4
    assert any(r.startswith("| GradScaler") and "overflowed step skipped: True" in r for r in rows)
    assert any(r.startswith("| fairseq-train --memory-efficient-fp16") for r in rows)
    assert any(r.startswith("| fairseq-train --amp on CPU | refused") for r in rows)
    assert any(r.startswith("| torch.compile(mdeq_tiny_cifar)") for r in rows)
    assert rows[-1].startswith("| wall time") and all(r.endswith("| pass |") for r in rows)
