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


def test_lab_quick_regression_writes_tables_and_resumes_only_what_is_missing(tmp_path, monkeypatch):
    args = ["--quick", "--methods", "lora", "--inits", "default", "LoRA-One", "--parts", "regression",
            "--reg-steps", "40", "-o", str(tmp_path)]
    lab.main(args)
    md = (tmp_path / "lab.md").read_text()
    assert "| lora | default |" in md and "| lora | LoRA-One |" in md and "## Claims" in md
    runs = sorted((tmp_path / "runs" / "regression").rglob("*.json"))
    assert len(runs) == 2 * 4 * 1 + 2 * 3  # 2 cells x 4 rates x 1 selection seed + 2 cells x 3 final seeds
    csv_rows = (tmp_path / "regression.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(runs)
    assert (tmp_path / "regression.png").stat().st_size > 0
    cells = (tmp_path / "cells.csv").read_text()
    assert "regression,lora,LoRA-One" in cells

    # a killed lab: one stored result lost; the rerun runs that one only and writes the same tables
    before = (tmp_path / "cells.csv").read_text()
    runs[0].unlink()
    calls = []
    real = lab.execute
    monkeypatch.setattr(lab, "execute", lambda s, run, v: calls.append(run.key) or real(s, run, v))
    lab.main(args)
    assert calls == [runs[0].stem]
    assert (tmp_path / "cells.csv").read_text() == before  # runs are deterministic per seed


def test_a_trained_run_is_scored_without_training_again(tmp_path, monkeypatch):
    """A SLURM array task (or a lab killed while scoring) left the run's summary.json: the lab only scores it."""
    import json

    import peftlab.train

    s = lab.Settings(out=tmp_path)
    run, v = lab.Run("language", "lora", "default", 3e-3, 0, "final"), lab.Variant("lora")
    work = lab.work_dir(s, run)
    work.mkdir(parents=True)
    summary = {"steps": 64, "initial_eval_loss": 1.7, "final_eval_loss": 0.1, "final_train_loss": 0.2,
               "trainable_params": 10, "train_time_s": 1.0}
    (work / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(peftlab.train, "train", lambda cfg: pytest.fail("trained again"))
    monkeypatch.setattr(lab, "score", lambda s, source, out: {"accuracy_strict": 0.5, "accuracy_flexible": 0.75,
                                                              "n": 4})
    row = lab.execute(s, run, v)
    assert (row["final_eval_loss"], row["accuracy_flexible"], row["seed"]) == (0.1, 0.75, 0)
    assert json.loads(lab.result_path(s, run).read_text()) == row
    other = lab.Settings(out=tmp_path, lm_steps=7)  # other settings: another folder, nothing reused
    assert lab.result_path(other, run) != lab.result_path(s, run) and not lab.result_path(other, run).exists()


def test_rate_selection_takes_the_lowest_mean_metric():
    s = lab.Settings(out=None, reg_steps=100)
    rows = [{"part": "language", "label": "lora", "init": "default", "lr": lr, "final_eval_loss": v}
            for lr, v in ((1e-3, 0.5), (1e-3, 0.7), (3e-3, 0.55), (3e-3, 0.56), (1e-2, 0.9), (1e-2, 0.1))]
    # means 0.6, 0.555, 0.5: the mean decides, not the best single seed (1e-3 has 0.5, 1e-2 has 0.1)
    assert lab.choose_rates(s, rows) == {("language", "lora", "default"): 1e-2}
    rows += [{"part": "regression", "label": "lora", "init": "default", "lr": lr, "steps_to_target": st,
              "final_loss": fl} for lr, st, fl in ((1e-2, None, 0.5), (3e-2, 50, 1e-3), (1e-1, 50, 1e-4))]
    rates = lab.choose_rates(s, rows)
    assert rates[("regression", "lora", "default")] == 1e-1  # equal steps: the lower final loss decides


def test_slurm_mode_writes_a_sweep_file_of_composable_run_lines(tmp_path):
    import shlex

    from peftlab.sweep import _check_compose

    res = lab.main(["--quick", "--slurm", "--methods", "lora", "--inits", "LoRA-One", "--parts", "language",
                    "-o", str(tmp_path)])
    assert res == {"pending": "select"}
    lines = (tmp_path / "sweep_select.txt").read_text().splitlines()
    assert len(lines) == 4  # 4 rates x 1 selection seed
    jobs = [shlex.split(line) for line in lines]
    assert {o for j in jobs for o in j if o.startswith("model.lr=")} == {"model.lr=0.001", "model.lr=0.003",
                                                                         "model.lr=0.01", "model.lr=0.03"}
    assert all("+init=gradient" in j and "++init.direction=LoRA-One" in j and "seed=1000" in j for j in jobs)
    assert all(any(o.startswith(f"run_dir={tmp_path}/runs/work/") for o in j) for j in jobs)
    _check_compose(jobs)  # each line is a valid run_exp.py command line


def test_inapplicable_inits_are_listed_not_run():
    plan, skipped = lab.cells(lab.Settings(out=None), ["rotational_pissa:way2"], ["default", "LoRA-GA"])
    assert [(v.label, i) for v, i in plan] == [("rotational_pissa:way2", "default")]
    assert list(skipped.values()) == [["LoRA-GA"]] and "LoRA factors" in next(iter(skipped))[1]


def test_unknown_init_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed"):
        lab.init_names(["nope"])


@pytest.mark.slow
def test_lab_language_part_runs_trains_and_scores(tmp_path):
    lab.main(["--quick", "--methods", "lora", "--inits", "default", "--parts", "language", "--lm-steps", "2",
              "--score-limit", "4", "--select-seeds", "1", "--final-seeds", "1", "--allow-few-seeds", "--widen", "0",
              "-o", str(tmp_path)])
    md = (tmp_path / "lab.md").read_text()
    assert "| lora | default |" in md and "base model" in md
    rows = (tmp_path / "language.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 + 1 + 1  # header, 4 selection rates, the base model, 1 final seed
    header = rows[0].split(",")
    assert "accuracy_flexible" in header
    acc = header.index("accuracy_strict")
    # selection runs are ranked by eval loss and not scored; the final one is
    assert [r.split(",")[acc] != "" for r in rows[1:]] == [True, True] + [False] * 4


@pytest.mark.slow
def test_jobs_fan_out_gives_the_same_results_as_one_process(tmp_path):
    args = ["--quick", "--methods", "lora", "--inits", "default", "--parts", "regression", "--reg-steps", "30"]
    lab.main(args + ["-o", str(tmp_path / "one")])
    lab.main(args + ["--jobs", "2", "-o", str(tmp_path / "two")])
    assert (tmp_path / "one" / "cells.csv").read_text() == (tmp_path / "two" / "cells.csv").read_text()


def test_full_fine_tuning_runs_in_the_regression_and_counts_every_weight():
    r = lab.run_regression(lab.Variant("full"), "default", seed=0, steps=60, target=0.01, lr=1e-2, d_in=16, d_out=12,
                           n=256)
    assert r["params"] == 16 * 12 and r["adapter_rank"] is None
    assert r["col_alignment"] != r["col_alignment"]  # nan: no factors to align
    assert r["final_loss"] < 0.5 * r["init_loss"]


def test_quick_cells_are_a_subset_of_the_full_labs():
    full = {(v.label, i) for v, i in lab.cells(lab.Settings(out=None), None, None)[0]}
    quick = {(v.label, i) for v, i in lab.cells(lab.Settings(out=None, quick=True), None, None)[0]}
    assert quick < full and ("full", "default") in quick and ("dora", "default") in quick
    assert {i for m, i in quick if m == "lora"} == set(lab.init_names(None))
    assert ("lora+loraplus16", "LoRA-One") not in full  # optimizer variants: the default init only


def test_a_grid_widens_by_half_decades_past_the_edge_its_best_rate_lies_on():
    quick = [1 / 3, 1.0, 10 / 3, 10.0]
    assert lab.widen(quick, "up") == pytest.approx([1 / 3, 1, 10 / 3, 10, 100 / 3])
    assert lab.widen(quick, "down") == pytest.approx([0.1, 1 / 3, 1, 10 / 3, 10])


def test_selection_widens_the_grid_of_a_cell_whose_best_rate_is_an_edge(tmp_path, monkeypatch):
    """A fake regression whose steps fall with the rate up to 0.3: the grid grows upward until the widening budget
    is spent, and the chosen rate is the best one probed."""
    def fake(v, init, seed, steps, target, lr=1e-2, **kw):
        if steps == 0:
            return {}
        return {"steps_to_target": int(100 - 100 * min(lr, 0.3)), "final_loss": 1e-3, "curve": [1.0]}

    monkeypatch.setattr(lab, "run_regression", fake)
    monkeypatch.setattr(lab, "write_report", lambda s, sel, fin, *a: {"sel": sel, "fin": fin})
    s = lab.Settings(out=tmp_path, parts=("regression",), lr_factors=(1 / 3, 1.0, 10 / 3, 10.0), select_seeds=1,
                     final_seeds=3, widen=2)
    res = lab.lab(s, ["lora"], ["default"])
    assert sorted({r["lr"] for r in res["sel"]}) == [0.00333, 0.01, 0.0333, 0.1, 0.333, 1.0]
    assert {r["lr"] for r in res["fin"]} == {0.333}


def test_results_are_keyed_by_the_resolved_dataset_not_the_option():
    """A stored run on the old default never counts for a new default: the folder names the resolved dataset."""
    from peftlab.config import default_dataset_name

    default = default_dataset_name()
    fp = lambda name: lab.fingerprint(lab.Settings(out=None, dataset=name), "language")
    assert fp(None) == fp(default)
    assert len({fp(None), fp("tiny"), fp("inventory")}) == 2


def test_a_negative_widening_is_refused_naming_the_flag_and_what_is_allowed():
    with pytest.raises(SystemExit, match=r"--widen -1: .*allowed: >= 0"):
        lab.main(["--widen", "-1", "--parts", "regression"])
