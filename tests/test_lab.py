"""The method lab: the planted regression, the principal angles, the gradient inits on it, and a quick run."""
import math

import pytest
import torch

from peftlab import lab


def test_planted_change_has_the_planted_rank_and_the_inputs_are_anisotropic():
    task = lab.make_regression(d_in=48, d_out=40, r_star=3, n=4096, anisotropy=10.0, seed=1)
    assert torch.linalg.matrix_rank(task.dW) == 3
    S = torch.linalg.svdvals(task.dW)[:3]
    assert torch.allclose(S, torch.linspace(1.0, 0.5, 3), atol=1e-5)
    assert torch.allclose(task.Y, task.X @ (task.W0 + task.dW).T)
    ev = torch.linalg.eigvalsh(task.sigma)  # sample covariance: spectrum 1 .. 1e-2 up to sampling error
    assert 50 < float(ev[-1] / ev[0]) < 200


def test_principal_angles_on_a_known_case_and_against_scipy():
    t = 0.3
    e = torch.eye(4, dtype=torch.float64)
    X = e[:, :2]  # span(e1, e2)
    Y = torch.stack([e[:, 0], math.cos(t) * e[:, 1] + math.sin(t) * e[:, 2]], 1) @ torch.tensor([[2.0, 1], [0, 3]],
                                                                                                 dtype=torch.float64)
    assert torch.allclose(lab.principal_angles(X, Y), torch.tensor([0.0, t], dtype=torch.float64), atol=1e-7)
    assert lab.alignment(X, Y) == pytest.approx((1 + math.cos(t) ** 2) / 2)
    assert math.isnan(lab.alignment(torch.zeros(4, 2), Y))  # a zero factor spans nothing

    from scipy.linalg import subspace_angles

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, 5, generator=g, dtype=torch.float64)
    ref = sorted(subspace_angles(A.numpy(), B.numpy()))
    assert torch.allclose(lab.principal_angles(A, B), torch.tensor(ref, dtype=torch.float64), atol=1e-8)


def test_lora_fa_recovers_the_row_space_that_the_input_covariance_tilts():
    """G = -(2/d_out) dW* Sigma: LoRA-One's rows span Sigma V*, LoRA-FA's metric maps them back onto V*."""
    rows = {}
    for direction in ("LoRA-One", "LoRA-FA"):
        r = lab.run_regression(lab.Variant("lora"), direction, seed=0, steps=1, target=1e-2)
        assert r["col_alignment"] == pytest.approx(1.0, abs=1e-6)  # both: B spans U* (rank r* = 4 <= r = 8)
        rows[direction] = r["row_alignment"]
    assert rows["LoRA-FA"] > 0.999
    assert rows["LoRA-One"] < 0.8


def test_lab_quick_on_one_method_writes_its_table(tmp_path):
    lab.main(["--quick", "--methods", "lora", "--inits", "default", "LoRA-One", "--parts", "regression",
              "--steps", "60", "-o", str(tmp_path)])
    md = (tmp_path / "lab.md").read_text()
    assert "| lora | default |" in md and "| lora | LoRA-One |" in md
    csv_rows = (tmp_path / "regression.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * 2  # header + 2 inits x 2 seeds
    assert (tmp_path / "regression.png").stat().st_size > 0


def test_unknown_init_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed"):
        lab.init_names(["nope"])


@pytest.mark.slow
def test_lab_language_part_runs(tmp_path):
    lab.main(["--quick", "--methods", "lora", "--inits", "default", "--parts", "language", "--lm-steps", "2",
              "--gsm8k-limit", "4", "-o", str(tmp_path)])
    md = (tmp_path / "lab.md").read_text()
    assert "| lora | default |" in md and "base model" in md
    assert (tmp_path / "language.csv").exists()
