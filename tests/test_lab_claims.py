"""The claims table on constructed results: a clear gain holds, a clear loss does not hold, noise is inconclusive,
a missing method is "not run"; every verdict comes from a paired interval over shared seeds."""
from peftlab.lab_claims import NOT_RUN, Claims
from peftlab.stats import FAILS, HOLDS, INCONCLUSIVE

SEEDS = range(4)
NOISE = [0.03, -0.02, 0.05, -0.04]  # shared per seed: pairing removes it


def lang(label, init, shift, jitter=(0, 0, 0, 0)):
    return [{"label": label, "init": init, "seed": s, "final_eval_loss": 1.0 + NOISE[s] + shift + jitter[s],
             "accuracy_strict": 0.5 - shift} for s in SEEDS]


def reg(label, init, steps, rank=8, params=1024, loss=1e-4):
    return [{"label": label, "init": init, "seed": s, "steps_to_target": steps[s], "adapter_rank": rank,
             "params": params, "final_loss": loss} for s in SEEDS]


def verdicts(rows):
    return {(r["claim"], r["evidence"].split(":")[0]): r["verdict"] for r in rows}


def test_claim_verdicts_follow_the_paired_intervals():
    L = (lang("lora", "default", 0) + lang("lora", "LoRA-One", -0.1) + lang("lora", "LoRA-GA", +0.1)
         + lang("lora", "pissa", 0, (0.05, -0.05, 0.05, -0.05)) + lang("full", "default", -0.3)
         + lang("gplora", "default", -0.01, (0.02, -0.03, 0.0, 0.02)))
    R = (reg("lora", "default", [50, 52, 49, 51]) + reg("lora", "LoRA-One", [30, 33, 31, 30])
         + reg("gplora", "default", [None] * 4) + reg("geolora", "default", [40] * 4, rank=4, params=4 * 132))
    v = verdicts(Claims(L, R, reg_steps=200, target=0.01).all())
    assert v[("Gradient init LoRA-One beats the default init", "language")] == HOLDS
    assert v[("Gradient init LoRA-One beats the default init", "regression")] == HOLDS
    assert v[("Gradient init LoRA-GA beats the default init", "language")] == FAILS
    assert v[("Gradient init LoRA-GA beats the default init", "regression")] == NOT_RUN
    assert v[("LoRA-One beats LoRA-GA beats LoRA", "language")] == FAILS  # the GA > LoRA link fails
    assert v[("PiSSA beats LoRA", "language")] == INCONCLUSIVE
    assert v[("GP-LoRA accelerates (steps to a loss target)", "regression")] == FAILS  # never reached the target
    assert v[("GP-LoRA ends lower", "language")] == INCONCLUSIVE
    assert v[("GeoLoRA finds the planted rank with fewer parameters at equal loss", "regression")] == HOLDS
    assert v[("DoRA beats LoRA", "language")] == NOT_RUN
    assert v[("Full fine-tuning is the ceiling", "language")] == HOLDS  # beats the best other cell (LoRA-One)


def test_geolora_claim_fails_when_it_keeps_a_larger_rank():
    R = reg("lora", "default", [50] * 4) + reg("geolora", "default", [40] * 4, rank=7, params=7 * 135)
    v = verdicts(Claims([], R, reg_steps=200, target=0.01).all())
    assert v[("GeoLoRA finds the planted rank with fewer parameters at equal loss", "regression")] == FAILS
