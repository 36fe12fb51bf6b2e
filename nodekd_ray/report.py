"""Tables 1-3 (Markdown, laid out as in the paper, the paper's numbers beside ours) and Figure 1
(PNG) from a sweep's trial records and attack Parquet files alone.

    nodekd report RESULTS_DIR        # writes RESULTS_DIR/report/{table1,table2,table3,attacks,audit}.md, figure1.png

Cells read "ours (paper)"; ours is the mean over seeds (± std with more than one seed) of the
final test accuracy in percent. Robust accuracies come from the attacked subset of the test set
(settings.json: attack_images), and count images the model already misclassifies as not robust.
"""
from __future__ import annotations

import io
import statistics

from .audit import audit_markdown, computation_key, mixed_cells, model_flags, verdict_lines
from .audit import label as _label
from .presets import TEACHERS
from .storage import Storage
from .work import read_attacks
from .names import DATASET_NAMES, MODEL_NAMES

# The paper's numbers (accuracy, %): Table 1, Table 2 (NODE(1) students), Table 3.
PAPER_TABLE1 = {
    "cifar10": {"node1": 63.45, "node100": 62.38, "resnet20": 89.09, "resnet32": 88.75, "resnet44": 90.32,
                "resnet56": 89.95, "resnet110": 88.26},
    "svhn": {"node1": 88.36, "node100": 88.68, "resnet20": 91.68, "resnet32": 90.96, "resnet44": 93.20,
             "resnet56": 94.58, "resnet110": 92.54},
}
PAPER_TABLE2 = {  # dataset -> T -> teacher -> accuracy of the NODE(1) student
    "cifar10": {3.0: [86.72, 86.42, 86.08, 86.32, 86.47], 10.0: [87.36, 87.75, 88.03, 86.94, 87.80],
                20.0: [87.96, 87.79, 87.10, 87.01, 87.41]},
    "svhn": {3.0: [93.46, 92.89, 93.12, 93.02, 93.53], 10.0: [93.12, 92.74, 92.46, 92.74, 93.14],
             20.0: [92.77, 92.24, 92.22, 92.67, 93.18]},
}
PAPER_TABLE2 = {d: {T: dict(zip(TEACHERS, v)) for T, v in rows.items()} for d, rows in PAPER_TABLE2.items()}
PAPER_TABLE3 = {"cifar10": {"clean": 69.94, 8.0: 25.07, 12.0: 23.60, 16.0: 21.29, 20.0: 20.24}}
TABLE3_EPS = (8.0, 12.0, 16.0, 20.0)
_NAMES, _DS = MODEL_NAMES, DATASET_NAMES


def _cell(values, paper=None) -> str:
    if not values:
        ours = "—"
    elif len(values) == 1:
        ours = f"{100 * values[0]:.2f}"
    else:
        ours = f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"
    return ours if paper is None else f"{ours} ({paper:.2f})"


def _md(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _done(records):
    return [r for r in records if r.get("status") == "done"]


def table1(records) -> str:
    recs = _done(records)
    datasets = sorted({r["dataset"] for r in recs})
    cols = [("node1", "NODEs(1)"), ("node100", "NODEs(100)")] + [(t, _NAMES[t]) for t in TEACHERS]

    def values(ds, col):
        if col.startswith("node"):
            t1 = float(col[4:])
            return [r["test_accuracy"] for r in recs if r["dataset"] == ds and r["kind"] == "node" and r["t1"] == t1]
        return [r["test_accuracy"] for r in recs if r["dataset"] == ds and r["kind"] == "teacher" and r["model"] == col]

    rows = [[_DS.get(ds, ds)] + [_cell(values(ds, c), PAPER_TABLE1.get(ds, {}).get(c)) for c, _ in cols]
            for ds in datasets]
    return ("Table 1. Accuracy (%) of Neural ODEs without knowledge distillation and of the ResNet teachers: "
            "ours (paper).\n\n" + _md(["Model / data set"] + [n for _, n in cols], rows))


def table2(records) -> str:
    recs = [r for r in _done(records) if r["kind"] == "node_kd"]
    groups = sorted({(r["dataset"], r["t1"], r["lam"], r["logits_mode"]) for r in recs})
    parts = ["Table 2. Accuracy (%) of the student Neural ODEs trained with knowledge distillation: ours (paper; "
             "the paper reports NODE(1) students only).\n"]
    for ds, t1, lam, mode in groups:
        g = [r for r in recs if (r["dataset"], r["t1"], r["lam"], r["logits_mode"]) == (ds, t1, lam, mode)]
        teachers = [t for t in TEACHERS if any(r["teacher"] == t for r in g)]
        temps = sorted({r["T"] for r in g})
        paper = PAPER_TABLE2.get(ds, {}) if (t1 == 1.0 and lam == 0.9 and mode == "paper") else {}
        rows = [[f"{T:g}"] + [_cell([r["test_accuracy"] for r in g if r["T"] == T and r["teacher"] == t],
                                    paper.get(T, {}).get(t)) for t in teachers] for T in temps]
        parts.append(f"\n{_DS.get(ds, ds)}, NODE({t1:g}) student, λ = {lam:g}, logits: {mode}\n\n"
                     + _md(["T / teacher"] + [_NAMES[t] for t in teachers], rows))
    if not groups:
        parts.append("\nNo finished KD students in this folder.\n")
    return "".join(parts)


def table3(records, attacks) -> str:
    recs = [r for r in _done(records) if r["kind"] == "node" and r["t1"] == 500.0]
    head = "Table 3. Accuracy (%) of Neural ODEs(500) without knowledge distillation under PGD: ours (paper).\n\n"
    if not recs:
        return head + "No finished NODE(500) students in this folder.\n"
    rows = []
    for ds in sorted({r["dataset"] for r in recs}):
        keys = [r["key"] for r in recs if r["dataset"] == ds]
        paper = PAPER_TABLE3.get(ds, {})
        row = [_DS.get(ds, ds), "Neural ODEs(500)",
               _cell([r["test_accuracy"] for r in recs if r["dataset"] == ds], paper.get("clean"))]
        for e in TABLE3_EPS:
            vals = [a["robust_accuracy"] for a in attacks
                    if a["attack"] == "pgd" and a["model_key"] in keys and a["eps_255"] == e]
            row.append(_cell(vals, paper.get(e)))
        rows.append(row)
    return head + _md(["Data set", "Model", "clean"] + [f"ε={e:g}/255" for e in TABLE3_EPS], rows)


def attacks_table(attacks) -> str:
    """Every attacked model: robust accuracy (%) per eps, mean over seeds."""
    if not attacks:
        return "No attack results in this folder.\n"
    parts = ["Robust accuracy (%) of every attacked model, mean over seeds; NFE = ODE evaluations per image. "
             "A model marked *degenerate* (near-chance clean accuracy, or one class for most images) has its "
             "numbers in parentheses: they are not robustness.\n"]
    flags = model_flags(attacks)
    mixed = mixed_cells(attacks)
    computations = sorted({computation_key(a) for a in attacks})
    parts.append("\nComputed on: " + "; ".join(computations) + ".\n")
    for ds in sorted({a["dataset"] for a in attacks}):
        for attack in sorted({a["attack"] for a in attacks if a["dataset"] == ds}):
            rows_in = [a for a in attacks if a["dataset"] == ds and a["attack"] == attack]
            eps = sorted({a["eps_255"] for a in rows_in})
            models = sorted({_label(a) for a in rows_in})
            rows = []
            for m in models:
                sel = [a for a in rows_in if _label(a) == m]
                bad = sorted({flags[a["model_key"]] for a in sel if flags.get(a["model_key"])})
                cells = [_cell([a["robust_accuracy"] for a in sel if a["eps_255"] == e])
                         + (" †" if (ds, attack, m, e) in mixed else "") for e in eps]
                if bad:
                    cells = [f"({c})" for c in cells]
                nfe = statistics.mean(a["nfe_per_image"] for a in sel)
                rows.append([m + (f" *degenerate: {'; '.join(bad)}*" if bad else "")] + cells + [f"{nfe:.0f}"])
            parts.append(f"\n{_DS.get(ds, ds)}, {attack.upper()}\n\n"
                         + _md(["model"] + [f"{e:g}" for e in eps] + ["NFE/img"], rows))
    if mixed:
        parts.append(f"\n† {len(mixed)} cell(s) average rows computed differently:\n\n" + "".join(
            f"- {_DS.get(ds, ds)} {attack} {m} ε={e:g}: {' | '.join(how)}\n"
            for (ds, attack, m, e), how in sorted(mixed.items())))
    return "".join(parts)


def figure1(records, attacks) -> bytes | None:
    """Accuracy vs eps as PNG bytes: rows PGD / MI-FGSM, one column per data set; ResNet, NODE, NODE-KD per horizon."""
    if not attacks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({a["dataset"] for a in attacks})
    kinds = [k for k in ("pgd", "mifgsm") if any(a["attack"] == k for a in attacks)]
    if not kinds:
        return None
    flags = model_flags(attacks)
    labels = sorted({m for attack in kinds for ds in datasets
                     for m in _figure_lines([a for a in attacks if a["dataset"] == ds and a["attack"] == attack])})
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colors = {m: cmap(i) for i, m in enumerate(labels)}  # one distinct colour per model, the same in every panel
    fig, axes = plt.subplots(len(kinds), len(datasets), figsize=(4.2 * len(datasets), 3.4 * len(kinds)),
                             squeeze=False)
    for i, attack in enumerate(kinds):
        for j, ds in enumerate(datasets):
            ax = axes[i][j]
            rows = [a for a in attacks if a["dataset"] == ds and a["attack"] == attack]
            for label in _figure_lines(rows):
                sel = [a for a in rows if _label(a) == label]
                eps = sorted({a["eps_255"] for a in sel})
                acc = [100 * statistics.mean(a["robust_accuracy"] for a in sel if a["eps_255"] == e) for e in eps]
                style = "--" if label.startswith("ResNet") else ("-" if "KD" in label else ":")
                if any(flags.get(a["model_key"]) for a in sel):   # its flat line is not robustness
                    ax.plot(eps, acc, ":", marker="x", markersize=3, alpha=0.5, color=colors[label],
                            label=f"{label} (degenerate)")
                    continue
                ax.plot(eps, acc, style, marker="o", markersize=3, label=label, color=colors[label])
            ax.set_title(f"{_DS.get(ds, ds)} under {'PGD' if attack == 'pgd' else 'MI-FGSM'}")
            ax.set_xlabel("ε (/255)")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _figure_lines(rows) -> list[str]:
    """The teachers, the no-KD NODEs, and per horizon the KD student with the best clean accuracy."""
    labels = sorted({_label(a) for a in rows if a["kind"] != "node_kd"})
    for t1 in sorted({a["t1"] for a in rows if a["kind"] == "node_kd"}):
        kd = [a for a in rows if a["kind"] == "node_kd" and a["t1"] == t1]
        best = max(sorted({_label(a) for a in kd}),
                   key=lambda m: statistics.mean(a["clean_accuracy"] for a in kd if _label(a) == m))
        labels.append(best)
    return labels


def write_report(results_dir: str, verdicts: list | None = None) -> dict:
    """Writes the tables, the audit and the figure into RESULTS_DIR/report (a path or a URI);
    returns {name: path}. ``verdicts``, when given, receives the audit's verdict lines."""
    storage = Storage(results_dir)
    storage.check_reachable()
    if not storage.isdir(storage.base):
        from .errors import ConfigError

        raise ConfigError("results_dir", f"no such folder: {results_dir}")
    records = storage.records()
    attacks = read_attacks(storage).to_pylist()
    paths = {}
    texts = [("Table 1", table1(records)), ("Table 2", table2(records)), ("Table 3", table3(records, attacks)),
             ("Attacks", attacks_table(attacks))]
    if attacks:
        text, v = audit_markdown(attacks)
        texts.append(("Audit", text))
        if verdicts is not None:
            verdicts.extend(verdict_lines(v))
    for name, text in texts:
        p = storage.path("report", name.lower().replace(" ", "") + ".md")
        storage.write_text(text, p)
        paths[name] = storage.url(p)
    png = figure1(records, attacks)
    if png:
        p = storage.path("report", "figure1.png")
        storage.write_bytes(p, png)
        paths["Figure 1"] = storage.url(p)
    return paths
