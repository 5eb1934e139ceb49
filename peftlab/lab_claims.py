"""The seeds' claims, each with a stated test and a verdict (holds / does not hold / inconclusive at this power).

Every comparison pairs the final-stage runs of two cells (method variant x init, each at its own chosen rate) by
seed and takes the 95% t-interval of the difference (peftlab.stats). Language claims: the verdict is on the eval loss
(continuous, so the most power per seed); the strict-accuracy difference is shown beside it. Regression claims about
speed: steps to the loss target, a run that missed counting as steps + 1 (so a censored difference is conservative).
A claim whose cells were not run (method not registered, or left out with --methods/--inits) says so.
"""
from __future__ import annotations

from .stats import FAILS, HOLDS, INCONCLUSIVE, Interval, combine, paired, t_interval, verdict

NOT_RUN = "not run"
LOSS_TEST = "paired t over shared seeds: eval loss(B) - eval loss(A) > 0 (95% CI)"
STEPS_TEST = "paired t over shared seeds: steps to target(B) - steps(A) > 0 (95% CI; a miss counts as steps + 1)"


def default_rotational() -> str:
    """The label of Rotational PiSSA at its default way (the one the claims compare with PiSSA)."""
    from .adapters import get_method

    return f"rotational_pissa:{get_method('rotational_pissa').parse(None).way}"


def index(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["label"], r["init"]), {})[r["seed"]] = r
    return out


class Claims:
    def __init__(self, lang: list[dict], reg: list[dict], reg_steps: int, target: float, r_star: int = 4):
        self.lang, self.reg = index(lang), index(reg)
        self.reg_steps, self.target, self.r_star = reg_steps, target, r_star
        self.rows: list[dict] = []

    # -- helpers
    def values(self, part: str, cell, key: str) -> dict:
        d = (self.lang if part == "language" else self.reg).get(cell, {})
        if key == "steps":
            return {s: (r["steps_to_target"] or self.reg_steps + 1) for s, r in d.items()}
        return {s: r.get(key) for s, r in d.items()}

    def missing(self, part: str, *cells) -> list:
        return [c for c in cells if c not in (self.lang if part == "language" else self.reg)]

    def add(self, claim, evidence, test, estimate, v):
        self.rows.append({"claim": claim, "evidence": evidence, "test": test, "estimate": estimate, "verdict": v})

    def not_run(self, claim, evidence, cells):
        self.add(claim, evidence, "-", "not run: " + ", ".join(f"{m} x {i}" for m, i in cells), NOT_RUN)

    def beats(self, part: str, a, b) -> tuple[Interval, str]:
        """A beats B: the interval of B - A on the eval loss (language) or the steps to target (regression)."""
        key = "final_eval_loss" if part == "language" else "steps"
        iv = paired(self.values(part, b, key), self.values(part, a, key))
        return iv, verdict(iv)

    def acc_note(self, a, b) -> str:
        iv = paired(self.values("language", a, "accuracy_strict"), self.values("language", b, "accuracy_strict"))
        return f"; strict accuracy A - B {iv.fmt(3)}"

    def compare(self, claim: str, part: str, a, b) -> None:
        """One 'A beats B' row."""
        evidence = ("language: eval loss" if part == "language" else "regression: steps to target") + \
            f" (A = {a[0]} x {a[1]}, B = {b[0]} x {b[1]})"
        gone = self.missing(part, a, b)
        if gone:
            return self.not_run(claim, evidence, gone)
        iv, v = self.beats(part, a, b)
        note = self.acc_note(a, b) if part == "language" else ""
        self.add(claim, evidence, LOSS_TEST if part == "language" else STEPS_TEST, f"B - A {iv.fmt(3)}{note}", v)

    def chain(self, claim: str, part: str, cells: list) -> None:
        """cells[0] beats cells[1] beats cells[2] ..."""
        evidence = ("language: eval loss" if part == "language" else "regression: steps to target") + \
            " (" + " > ".join(f"{m} x {i}" for m, i in cells) + ")"
        gone = self.missing(part, *cells)
        if gone:
            return self.not_run(claim, evidence, gone)
        links = [self.beats(part, a, b) for a, b in zip(cells, cells[1:])]
        est = "; ".join(f"({b[0]} x {b[1]}) - ({a[0]} x {a[1]}) {iv.fmt(3)}"
                        for (a, b), (iv, _) in zip(zip(cells, cells[1:]), links))
        self.add(claim, evidence, (LOSS_TEST if part == "language" else STEPS_TEST) + ", every link",
                 est, combine([v for _, v in links]))

    # -- the claims
    def geolora(self) -> None:
        claim = "GeoLoRA finds the planted rank with fewer parameters at equal loss"
        geo, lora = ("geolora", "default"), ("lora", "default")
        evidence = f"regression: final adapter rank vs planted r* = {self.r_star}, parameters, final loss vs LoRA"
        gone = self.missing("regression", geo, lora)
        if gone:
            return self.not_run(claim, evidence, gone)
        rank = t_interval(self.values("regression", geo, "adapter_rank").values())
        p_geo = t_interval(self.values("regression", geo, "params").values())
        p_lora = t_interval(self.values("regression", lora, "params").values())
        loss = paired(self.values("regression", geo, "final_loss"), self.values("regression", lora, "final_loss"))
        lo_r, hi_r = self.r_star - 0.5, self.r_star + 0.5
        if rank.n >= 2 and lo_r <= rank.lo and rank.hi <= hi_r and p_geo.mean < p_lora.mean and loss.hi <= self.target:
            v = HOLDS
        elif rank.n >= 2 and (rank.lo > hi_r or rank.hi < lo_r or p_geo.mean >= p_lora.mean or loss.lo > self.target):
            v = FAILS
        else:
            v = INCONCLUSIVE
        self.add(claim, evidence, f"rank 95% CI inside [{lo_r:g}, {hi_r:g}], mean parameters below LoRA's, paired "
                 f"final-loss difference (GeoLoRA - LoRA, relative to L(W0)) 95% CI below the target {self.target:g}",
                 f"rank {rank.fmt(3)}; parameters {p_geo.fmt(4)} vs LoRA {p_lora.fmt(4)}; loss difference "
                 f"{loss.fmt(3)}", v)

    def ceiling(self) -> None:
        claim = "Full fine-tuning is the ceiling"
        full = ("full", "default")
        if full not in self.lang:
            return self.not_run(claim, "language: eval loss", [full])
        others = {c: sum(r["final_eval_loss"] for r in d.values()) / len(d) for c, d in self.lang.items() if c != full}
        if not others:
            return self.not_run(claim, "language: eval loss", [("any other method", "-")])
        best = min(others, key=others.get)
        self.compare(claim, "language", full, best)
        self.rows[-1]["evidence"] += " (B = the best other cell by mean eval loss)"

    def all(self) -> list[dict]:
        lora = ("lora", "default")
        for d in ("LoRA-GA", "LoRA-One", "LoRA-FA"):
            for part in ("language", "regression"):
                self.compare(f"Gradient init {d} beats the default init", part, ("lora", d), lora)
        for part in ("language", "regression"):
            self.chain("LoRA-One beats LoRA-GA beats LoRA", part, [("lora", "LoRA-One"), ("lora", "LoRA-GA"), lora])
            self.compare("PiSSA beats LoRA", part, ("lora", "pissa"), lora)
            if part == "regression" and self.rows[-1]["verdict"] != NOT_RUN:
                self.rows[-1]["evidence"] += (f"; caveat: PiSSA's adapter must hold W0's top-r part and dW*, a "
                                              f"rank of r + r* = 8 + {self.r_star} for a generic W0, so the target is "
                                              f"out of its reach at rank 8")
        self.compare("GP-LoRA accelerates (steps to a loss target)", "regression", ("gplora", "default"), lora)
        self.compare("GP-LoRA ends lower", "language", ("gplora", "default"), lora)
        self.geolora()
        rot = (default_rotational(), "default")  # the method's default way; else whichever way ran
        if rot not in self.lang:
            rot = next((c for c in self.lang if c[0].startswith("rotational_pissa") and c[1] == "default"), rot)
        self.compare("Rotational PiSSA beats PiSSA", "language", rot, ("lora", "pissa"))
        self.compare("DoRA beats LoRA", "language", ("dora", "default"), lora)
        self.compare("LoRA+ (ratio 16) beats LoRA", "language", ("lora+loraplus16", "default"), lora)
        self.ceiling()
        return self.rows
