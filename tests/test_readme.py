"""README figures are generated: regenerating the marked blocks from the committed results changes nothing, and a
changed result changes the README (so the check can fail)."""
import json
import shutil

import pytest

from bench import readme


def test_readme_blocks_match_the_committed_results():
    text = readme.ROOT.joinpath("README.md").read_text()
    assert "<!-- generated:bench -->" in text and "<!-- generated:lab -->" in text
    assert readme.rewrite(text, readme.blocks()) == text, "README figures differ from bench/results: run " \
                                                          "python -m bench.readme"


def test_a_changed_result_changes_the_readme(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(readme.RESULTS, results)
    e2e = json.loads((results / "e2e.json").read_text())
    e2e["hf_vs_peftlab_process_time"] = 9.87
    (results / "e2e.json").write_text(json.dumps(e2e))
    readme_copy = tmp_path / "README.md"
    readme_copy.write_text(readme.ROOT.joinpath("README.md").read_text())
    assert readme.main(["--readme", str(readme_copy), "--results", str(results), "--check"]) == 1
    assert readme.main(["--readme", str(readme_copy), "--results", str(results)]) == 0
    assert "| 9.87; " in readme_copy.read_text()
    assert readme.main(["--readme", str(readme_copy), "--results", str(results), "--check"]) == 0


def test_lab_block_shows_intervals_and_verdicts(tmp_path):
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "lab.json").write_text(json.dumps({"command": "python -m peftlab.lab", "date": "2026-01-01 00:00",
                                              "machine": "m", "select_seeds": 2, "lr_factors": [1, 2],
                                              "final_seeds": 5}))
    rows = ["part,method,init,lr,metric,name,n,mean,lo,hi"]
    rows += [f"language,lora,default,0.003,{k},x,5,0.5,0.4,0.6" for k in ("final_eval_loss", "accuracy_strict",
                                                                          "accuracy_flexible")]
    (lab / "cells.csv").write_text("\n".join(rows) + "\n")
    (lab / "claims.csv").write_text("claim,evidence,test,estimate,verdict\nPiSSA beats LoRA,language,t,"
                                    "B - A 0.1 [-0.1; 0.3],inconclusive at this power\n")
    block = readme.lab_block(lab)
    assert "| lora | default | 0.003 | 5 | 0.5 [0.4, 0.6] |" in block
    assert "| PiSSA beats LoRA | language | B - A 0.1 [-0.1; 0.3] | inconclusive at this power |" in block


def test_missing_marker_is_named():
    with pytest.raises(ValueError, match="generated:lab"):
        readme.rewrite("<!-- generated:bench -->\n<!-- /generated -->\n", {"bench": "x\n", "lab": "y\n"})
