"""The attack audit's report: is the students' robustness real? (``nodekd report`` writes audit.md.)

Input: the attack rows of a sweep (sweep.read_attacks), one per model x attack x eps. Per model
(one seed each), at each eps:
  * paper     = the lower robust accuracy of the paper's attacks (PGD, MI-FGSM at 1/255 steps);
  * strongest = the lowest robust accuracy of any attack run on it (which one is named);
  * gap       = paper - strongest: how much the paper's attacks overstate robustness.
A model's robustness score is the mean over eps > 0 of its strongest-attack accuracy: the
strongest attack is taken per eps, not per image (per-image worst case over attacks would be
lower still; the rows are aggregates).

Degenerate models (degenerate()) are flagged and left out of every verdict: a model that predicts
one class for everything "keeps" its clean accuracy at every eps.

Verdicts (supported / refuted / inconclusive). The paired claims are judged on one difference per seed (a
seed's pairs averaged first: in a Table-2 sweep 15 KD students share one baseline per seed, and counting
pairs would understate the spread), with a 95% t-interval on n - 1 degrees of freedom over the n seeds:
  * "KD improves robustness": KD student minus the no-KD NODE of the same data set, horizon and
    seed. Supported when the interval lies above 0, refuted when below, else inconclusive.
  * "a longer horizon improves robustness": the same model (kind, teacher, T, seed) at the longer
    horizon minus at the shortest; same rule.
  Each is also judged per group, the groups declared here before any data are read (DECLARED_GROUPS):
  KD by horizon, the horizon by student (no KD, or KD with each teacher and T).
Two claims about gradient masking, kept apart (a tolerance effect is not an obfuscated gradient):
  * "no obfuscated gradients": for each non-degenerate NODE, the best attack that does not use the
    model's own gradient at its own tolerance (Square, transfer, gradients through rk4 or through a
    solve at rtol 1e-5) against the best white-box gradient attack through the model itself. Refuted when
    an indirect attack beats every white-box one by more than MASKING_MARGIN points at some eps in any
    model (Athalye et al.'s sign of obfuscated gradients); supported when none does and the audit had
    indirect attacks to compare; inconclusive otherwise.
  * "robust accuracy depends on the solver tolerance": pgd-conv at a tol-* setting (attacked and evaluated
    at that tolerance) against pgd-conv at the model's own tolerance, same steps: supported when it moves
    robust accuracy by more than TOLERANCE_MARGIN points at some eps > 0 (Carrara et al.'s effect: another
    tolerance is another function, so this says nothing about masking), refuted when it never does,
    inconclusive when no tolerance was compared.
"""
from __future__ import annotations

import math
import statistics

from scipy import stats

from .names import MODEL_NAMES

PAPER = ("pgd", "mifgsm")
WHITE_BOX = ("pgd", "mifgsm", "fgsm", "pgd-conv", "pgd-long", "pgd-restarts", "apgd-ce", "apgd-dlr")
INDIRECT = ("square", "transfer-teacher", "transfer-node", "pgd-rk4", "transfer-tol-1e-5")
TOLERANCE_ATTACKS = ("tol-1e-1", "tol-1e-3", "tol-1e-5")
MASKING_MARGIN = 3.0     # accuracy points
TOLERANCE_MARGIN = 10.0  # accuracy points
CONFIDENCE = 0.95        # the paired claims' t-intervals
# The groups each paired claim is also judged in, fixed before the data are read (not chosen after a pooled
# verdict comes out inconclusive): the KD claim per horizon, the horizon claim per student.
DECLARED_GROUPS = {"KD improves robustness": "horizon", "a longer horizon improves robustness": "student"}
NAMES = MODEL_NAMES


def degenerate(clean_accuracy: float, top_class_fraction: float | None, num_classes: int | None) -> str | None:
    """Why a model's robust accuracy says nothing, or None: clean accuracy below twice chance
    (2/K), or half or more of its clean predictions one class (a class is 1/K of the data)."""
    k = int(num_classes or 10)
    if clean_accuracy < 2.0 / k:
        return f"clean accuracy {100 * clean_accuracy:.1f}% is near chance ({100 / k:.0f}%)"
    if top_class_fraction is not None and k >= 4 and top_class_fraction >= 0.5:
        return f"{100 * top_class_fraction:.0f}% of its predictions are one class"
    return None


def label(a: dict, seed: bool = False) -> str:
    if a["kind"] == "teacher":
        s = NAMES.get(a["model"], a["model"])
    elif a["kind"] == "node":
        s = f"NODE({a['t1']:g})"
    else:
        s = f"NODE({a['t1']:g})-KD {NAMES.get(a['teacher'], a['teacher'])} T={a['T']:g}"
    return f"{s} s{a['seed']}" if seed else s


# how a row was computed (sweep.ATTACK_SCHEMA); rows written before 2026-12-05 hold nulls there
COMPUTATION_COLUMNS = ("computation", "precision", "step_control", "solver_impl", "norm_impl", "cuda_graphs", "device")


def computation_key(a: dict) -> str:
    """One readable line for how an attack row was computed, e.g. 'reference: fp32, torchdiffeq/plain, cpu'."""
    if a.get("computation") is None:
        return f"unrecorded (written before 2026-12-05: as trained), {a.get('device') or '?'}"
    solve = f", {a['solver_impl']}/{a['step_control']}" if a.get("solver_impl") else ""
    extra = (", triton norms" if a.get("norm_impl") == "triton" else "") + (", CUDA graphs" if a.get("cuda_graphs") else "")
    return f"{a['computation']}: {a['precision']}{solve}{extra}, {a.get('device') or '?'}"


def mixed_cells(rows) -> dict:
    """(data set, attack, model without its seed, eps) -> the computations of its rows, for every such table
    cell whose rows were computed differently (seeds on other hardware or settings, or old and new files)."""
    cells: dict = {}
    for a in rows:
        cells.setdefault((a["dataset"], a["attack"], label(a), a["eps_255"]), set()).add(computation_key(a))
    return {k: sorted(v) for k, v in cells.items() if len(v) > 1}


def _clean_rows(rows):
    """The clean measurement of a model: its eps = 0 rows at the model's own tolerance."""
    return [a for a in rows if a["attack"] not in TOLERANCE_ATTACKS]


def model_flags(attacks) -> dict:
    """model_key -> degenerate reason (None when the model is fine)."""
    out = {}
    for key in sorted({a["model_key"] for a in attacks}):
        rows = _clean_rows([a for a in attacks if a["model_key"] == key]) or [a for a in attacks if a["model_key"] == key]
        clean = statistics.mean(a["clean_accuracy"] for a in rows)
        tops = [a["top_class_fraction"] for a in rows if a.get("top_class_fraction") is not None]
        out[key] = degenerate(clean, max(tops) if tops else None, rows[0].get("num_classes"))
    return out


class ModelAudit:
    """One model's accuracies (%) per attack and eps."""

    def __init__(self, key, rows):
        self.key = key
        self.rows = rows
        self.info = rows[0]
        self.acc = {}   # (attack, eps) -> %
        for a in rows:
            self.acc.setdefault((a["attack"], a["eps_255"]), []).append(100 * a["robust_accuracy"])
        self.acc = {k: statistics.mean(v) for k, v in self.acc.items()}
        main = _clean_rows(rows) or rows
        self.clean = 100 * statistics.mean(a["clean_accuracy"] for a in main)
        self.eps = sorted({e for (att, e) in self.acc if att not in TOLERANCE_ATTACKS and e > 0})

    def best(self, eps, attacks) -> tuple[float, str] | None:
        got = [(v, att) for (att, e), v in self.acc.items() if e == eps and att in attacks]
        return min(got) if got else None

    def tolerances(self, eps) -> dict:
        """rtol -> accuracy (%) of pgd-conv at eps: the tol-* attacks, and pgd-conv itself at the model's
        own tolerance (the same attack and steps; the reference a tolerance sweep moves from)."""
        out = {float(a["rtol"]): 100 * a["robust_accuracy"] for a in self.rows
               if a["attack"] in TOLERANCE_ATTACKS and a["eps_255"] == eps and a.get("rtol") is not None}
        own = [a for a in self.rows if a["attack"] == "pgd-conv" and a["eps_255"] == eps and a.get("rtol") is not None]
        if out and own:
            out.setdefault(float(own[0]["rtol"]), 100 * own[0]["robust_accuracy"])
        return out

    def paper(self, eps):
        return self.best(eps, PAPER)

    def strongest(self, eps):
        return self.best(eps, tuple(a for a in {att for att, _ in self.acc} if a not in TOLERANCE_ATTACKS))

    def score(self) -> float | None:
        vals = [self.strongest(e)[0] for e in self.eps if self.strongest(e)]
        return statistics.mean(vals) if vals else None


def _fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half width) of the ``confidence`` t-interval of the mean, n - 1 degrees of freedom."""
    n = len(values)
    m = statistics.mean(values)
    return m, stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)


EQUIVALENCE_MARGIN = 2.0   # accuracy points: a computation is "equivalent" when its intervals lie within +-this


def computation_verdict(differences: dict, margin: float = EQUIVALENCE_MARGIN) -> dict:
    """Does a computation change the answer? differences: {metric: [one seed-paired difference per seed, in
    accuracy points]} for clean and robust accuracy. "equivalent" when every metric's 95% t-interval lies
    within +-margin; otherwise "changes the answer" when some metric's interval excludes 0, else
    "inconclusive". Fewer than 2 seeds in a metric: "inconclusive"."""
    parts = {}
    for metric, values in differences.items():
        values = [float(v) for v in values]
        if len(values) < 2:
            parts[metric] = {"n": len(values)}
            continue
        m, half = t_interval(values)
        parts[metric] = {"mean": m, "half": half, "n": len(values)}
    full = [p for p in parts.values() if "mean" in p]
    if len(full) == len(parts) and all(-margin <= p["mean"] - p["half"] and p["mean"] + p["half"] <= margin
                                      for p in full):
        verdict = "equivalent"
    elif any(p["mean"] - p["half"] > 0 or p["mean"] + p["half"] < 0 for p in full):
        verdict = "changes the answer"
    else:
        verdict = "inconclusive"
    return {"verdict": verdict, "metrics": parts}


def per_seed(pairs) -> dict:
    """[(seed, difference)] -> {seed: the mean of that seed's differences}: one difference per seed."""
    by: dict = {}
    for seed, d in pairs:
        by.setdefault(seed, []).append(d)
    return {seed: statistics.mean(ds) for seed, ds in sorted(by.items())}


def _paired_verdict(claim, pairs, what, groups=None, by="") -> dict:
    """pairs: [(seed, difference)]; groups: a (sort key, label) per pair, from the claim's declared grouping
    (DECLARED_GROUPS). With more than one group, the same rule is applied to each group too and the result
    lists them after the pooled verdict ("parts"): a pooled mean can hide two groups that go opposite ways."""
    assert DECLARED_GROUPS.get(claim, by) == by, (claim, by)
    out = _pooled_verdict(claim, pairs, what)
    if groups and len(set(groups)) > 1:
        out["parts"] = []
        for g in sorted(set(groups)):
            sub = _pooled_verdict(claim, [p for p, gg in zip(pairs, groups) if gg == g], what)
            out["parts"].append({"group": g[1], **{k: sub[k] for k in ("verdict", "mean", "half", "n") if k in sub}})
        out["why"] += f"; by {by}: " + ", ".join(
            f"{p['group']}: {p['mean']:+.1f} ± {p['half']:.1f} ({p['n']} seeds, {p['verdict']})" if "mean" in p
            else f"{p['group']}: too few seeds" for p in out["parts"])
    return out


def _pooled_verdict(claim, pairs, what) -> dict:
    seeds = per_seed(pairs)
    if len(seeds) < 2:
        return {"claim": claim, "verdict": "inconclusive",
                "why": f"{len(pairs)} usable pair(s) ({what}) from {len(seeds)} seed(s); at least 2 "
                       "seeds of non-degenerate models are needed"}
    m, half = t_interval(list(seeds.values()))
    verdict = "supported" if m - half > 0 else ("refuted" if m + half < 0 else "inconclusive")
    return {"claim": claim, "verdict": verdict, "mean": m, "half": half, "n": len(seeds),
            "why": f"{what}: {m:+.1f} ± {half:.1f} points ({100 * CONFIDENCE:g}% t-interval of the robustness "
                   f"score's difference, {len(seeds) - 1} degrees of freedom: {len(seeds)} seeds, "
                   f"{len(pairs)} pairs averaged within each seed)"}


def verdicts(models: dict, flags: dict) -> list[dict]:
    ok = {k: m for k, m in models.items() if not flags.get(k) and m.score() is not None}
    nodes = [m for m in ok.values() if m.info["kind"] in ("node", "node_kd")]
    out = []
    # KD
    base = {(m.info["dataset"], m.info["t1"], m.info["seed"]): m for m in nodes if m.info["kind"] == "node"}
    kd = [m for m in nodes if m.info["kind"] == "node_kd" and (m.info["dataset"], m.info["t1"], m.info["seed"]) in base]
    diffs = [(m.info["seed"], m.score() - base[(m.info["dataset"], m.info["t1"], m.info["seed"])].score()) for m in kd]
    out.append(_paired_verdict("KD improves robustness", diffs, "KD student minus no-KD NODE",
                               groups=[(m.info["t1"], f"t1={m.info['t1']:g}") for m in kd], by="horizon"))
    # horizon
    groups = {}
    for m in nodes:
        i = m.info
        groups.setdefault((i["dataset"], i["kind"], i.get("teacher"), i.get("T"), i["seed"]), {})[i["t1"]] = m
    diffs, kinds = [], []
    for g in groups.values():
        if len(g) > 1:
            short = g[min(g)]
            longer = [t for t in g if t != min(g)]
            diffs += [(short.info["seed"], g[t].score() - short.score()) for t in longer]
            i = short.info
            kind = ((0, "", 0.0), "without KD") if i["kind"] == "node" else (
                (1, i.get("teacher") or "", i.get("T") or 0.0), f"KD {i.get('teacher')} T={i.get('T'):g}")
            kinds += [kind] * len(longer)
    out.append(_paired_verdict("a longer horizon improves robustness", diffs, "longer minus shortest horizon",
                               groups=kinds, by="student"))
    # gradient masking
    masked, compared, tol_moves, tol_compared = [], 0, [], 0
    for m in nodes:
        for e in m.eps:
            wb, ind = m.best(e, WHITE_BOX), m.best(e, INDIRECT)
            if wb and ind:
                compared += 1
                if ind[0] < wb[0] - MASKING_MARGIN:
                    masked.append(f"{label(m.info, True)} at ε={e:g}: {ind[1]} {ind[0]:.1f}% < white-box {wb[1]} "
                                  f"{wb[0]:.1f}%")
        for e in m.eps:
            tol = m.tolerances(e)
            if len(tol) > 1:
                tol_compared += 1
                lo, hi = min(tol, key=tol.get), max(tol, key=tol.get)
                if tol[hi] - tol[lo] > TOLERANCE_MARGIN:
                    tol_moves.append(f"{label(m.info, True)} at ε={e:g}: pgd-conv accuracy {tol[lo]:.1f}% at rtol "
                                     f"{lo:g}, {tol[hi]:.1f}% at rtol {hi:g}")
    gaps = [m.paper(e)[0] - m.strongest(e)[0] for m in nodes for e in m.eps if m.paper(e) and m.strongest(e)]
    gap = (f"; the paper's attacks overstate NODE robustness by {statistics.mean(gaps):.1f} points on average "
           f"(at most {max(gaps):.1f})" if gaps else "")
    claim = "no obfuscated gradients"
    if masked:
        out.append({"claim": claim, "verdict": "refuted",
                    "why": f"{len(masked)} of {compared} (model, ε) cases where an attack without the model's own "
                           f"gradient beats every white-box one by > {MASKING_MARGIN:g} points; e.g. "
                           f"{'; '.join(masked[:3])}{gap}"})
    elif compared:
        out.append({"claim": claim, "verdict": "supported",
                    "why": f"in all {compared} (model, ε) cases the best white-box gradient attack is within "
                           f"{MASKING_MARGIN:g} points of, or stronger than, the attacks without the model's own "
                           f"gradient (Square, transfer, rk4 or rtol-1e-5 gradients){gap}"})
    else:
        out.append({"claim": claim, "verdict": "inconclusive",
                    "why": "no non-degenerate NODE was attacked both white-box and without its own gradient"})
    claim = "robust accuracy depends on the solver tolerance"
    if tol_moves:
        out.append({"claim": claim, "verdict": "supported",
                    "why": f"{len(tol_moves)} of {tol_compared} (model, ε) cases where the test-time solver "
                           f"tolerance moves robust accuracy by > {TOLERANCE_MARGIN:g} points; e.g. "
                           f"{'; '.join(tol_moves[:3])}"})
    elif tol_compared:
        out.append({"claim": claim, "verdict": "refuted",
                    "why": f"in all {tol_compared} (model, ε) cases with a test-time tolerance sweep the tolerance "
                           f"moves robust accuracy by ≤ {TOLERANCE_MARGIN:g} points"})
    else:
        out.append({"claim": claim, "verdict": "inconclusive", "why": "no test-time tolerance was compared"})
    return out


def audit_markdown(attacks) -> tuple[str, list[dict]]:
    """(audit.md text, verdicts) from attack rows (dicts with ATTACK_SCHEMA's columns)."""
    flags = model_flags(attacks)
    models = {k: ModelAudit(k, [a for a in attacks if a["model_key"] == k]) for k in flags}
    v = verdicts(models, flags)
    out = ["# Attack audit", "",
           "Robust accuracy (%) per model (one seed each) under the paper's attacks (the lower of PGD and "
           "MI-FGSM at 1/255 steps) and under the strongest attack run on it; gap = paper − strongest. "
           "Images a model misclassifies count as not robust.", "", "## Verdicts", ""]
    for x in v:
        out.append(f"- **{x['claim']}: {x['verdict']}.** {x['why']}.")
    bad = {k: why for k, why in flags.items() if why}
    if bad:
        out += ["", "Degenerate models (left out of every verdict; their robust accuracy is not robustness):", ""]
        out += [f"- {label(models[k].info, True)} ({k}): {why}" for k, why in sorted(bad.items())]
    for ds in sorted({m.info["dataset"] for m in models.values()}):
        out += ["", f"## {ds}", "", "| model | clean | ε (/255) | paper | strongest | attack | gap |",
                "|---|---|---|---|---|---|---|"]
        for k in sorted((k for k, m in models.items() if m.info["dataset"] == ds), key=lambda k: label(models[k].info, True)):
            m = models[k]
            name = label(m.info, True) + (" (degenerate)" if flags[k] else "")
            for e in m.eps:
                p, s = m.paper(e), m.strongest(e)
                cell = (lambda x: f"({x:.1f})" if flags[k] else f"{x:.1f}")
                out.append(f"| {name} | {m.clean:.1f} | {e:g} | {cell(p[0]) if p else '—'} | "
                           f"{cell(s[0]) if s else '—'} | {s[1] if s else '—'} | "
                           f"{_fmt(p[0] - s[0]) if p and s else '—'} |")
        tol = [a for a in attacks if a["dataset"] == ds and a["attack"] in TOLERANCE_ATTACKS]
        swept = {a["model_key"] for a in tol}
        tol += [a for a in attacks if a["model_key"] in swept and a["attack"] == "pgd-conv" and a.get("rtol") is not None
                and not any(b["model_key"] == a["model_key"] and b["rtol"] == a["rtol"] for b in tol)]
        if tol:
            out += ["", "Test-time tolerance (rtol = atol): clean and pgd-conv accuracy (%), NFE per image; "
                    "the row at the model's own rtol is its pgd-conv row", "",
                    "| model | rtol | ε (/255) | clean | robust | NFE/img |", "|---|---|---|---|---|---|"]
            for a in sorted(tol, key=lambda a: (label(a, True), -a["rtol"], a["eps_255"])):
                out.append(f"| {label(a, True)} | {a['rtol']:g} | {a['eps_255']:g} | {100 * a['clean_accuracy']:.1f} | "
                           f"{100 * a['robust_accuracy']:.1f} | {a['nfe_per_image']:.0f} |")
    out += ["", "Rules: nodekd_ray/audit.py (score = mean over ε > 0 of the strongest attack's accuracy; "
                f"masking margin {MASKING_MARGIN:g} points, tolerance margin {TOLERANCE_MARGIN:g} points)."]
    return "\n".join(out) + "\n", v


def verdict_lines(v: list[dict]) -> list[str]:
    return [f"{x['claim']}: {x['verdict'].upper()} ({x['why']})" for x in v]
