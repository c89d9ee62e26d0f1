"""The paper's figures, redrawn from the results table alone (no model is loaded).

Each function takes the table (`cai.analysis.gather.gather`) and the paper's values
(`paper_reference()`: read off the figures of Bai et al. 2022, arXiv 2212.08073; copied from
../shared/reference/paper_figures.json into src/cai/resources/reference/) and returns a
matplotlib figure: the paper's series in their own panels (their Elo and PM scales are not ours),
this project's beside them, each clearly labelled. `draw_all` writes PNG and PDF files and the
Elo table in markdown.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from cai.analysis.gather import gather, gather_calibration
from cai.analysis.pooling import holds, pool_over_seeds
from cai.artifacts import atomic_path, write_text_atomic  # noqa: E402

log = logging.getLogger(__name__)

REFERENCE = Path(__file__).resolve().parents[1] / "resources" / "reference" / "paper_figures.json"
PAPER_SERIES = {  # paper key -> our method name
    "helpful_rlhf": "helpful_rlhf",
    "hh_rlhf": "hh_rlhf",
    "rl_cai": "rl_cai",
    "rl_cai_cot": "rl_cai_cot",
}
LABELS = {
    "helpful": "Helpful model",
    "sl_cai": "SL-CAI",
    "rl_cai": "RL-CAI",
    "rl_cai_cot": "RL-CAI w/ CoT",
    "helpful_rlhf": "Helpful RLHF",
    "hh_rlhf": "HH RLHF",
    "rl_cai_dpo": "RL-CAI (DPO)",
    "hh_dpo": "HH DPO",
}
DIMENSIONS = ("helpfulness", "harmlessness")


def paper_reference() -> dict:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no rows yet:\n{what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _params_label(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _params_of(names: list[str]) -> list[float]:
    """'810M', '6.4B' -> parameter counts."""
    return [float(s[:-1]) * (1e9 if s.endswith("B") else 1e6) for s in names]


def _with_interval(ax, x, group: pd.DataFrame, label: str, fmt: str = "o-", **style) -> None:
    """group.value against x, with error bars from group.low to group.high; a series from an
    untrusted or dependent judge says so in its label (and is drawn dashed and faded). A value
    pooled over seeds (cai.analysis.pooling) shows each seed's own value as a small point."""
    trust = _style(group, fmt) if "flag" in group else {"fmt": fmt}
    seeds = int(group.seeds.max()) if "seeds" in group and len(group) else 1
    drawn = ax.errorbar(
        x,
        group.value,
        yerr=[group.value - group.low, group.high - group.value],
        capsize=2,
        label=(_series_label(label, group) if "flag" in group else label)
        + (f" (mean of {seeds} seeds)" if seeds > 1 else ""),
        **trust,
        **style,
    )
    if seeds > 1:
        _seed_points(ax, list(x), list(group.seed_values), drawn.lines[0].get_color())


def _seed_points(ax, x: list, seed_values: list[dict], colour) -> None:
    """Each seed's own value beside a pooled point (small, unlabelled, the series' colour)."""
    xs = [xi for xi, values in zip(x, seed_values, strict=True) for _ in (values or {})]
    ys = [v for values in seed_values for v in (values or {}).values()]
    ax.scatter(xs, ys, s=9, color=colour, alpha=0.55, zorder=3, linewidths=0)


def elo_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[(table.stage == "eval") & (table.metric == "elo")]


UNTRUSTED = ("at_chance", "below_chance", "unvalidated", "not_above_")


def untrusted(group: pd.DataFrame) -> str:
    """The trust problem of a group of rows' judge ('at chance', 'below chance', 'unvalidated',
    'not above shorter wins': its margin over that trivial rule has an interval reaching 0) or
    '' when its judge is validated (cai.eval.validation.verdict)."""
    flags = ";".join(str(f) for f in group.get("flag", pd.Series(dtype=str)).fillna(""))
    for flag in UNTRUSTED:
        if flag in flags:
            found = re.search(rf"{flag}[a-z_]*", flags).group(0)
            return found.replace("_", " ")
    return ""


def _series_label(label: str, group: pd.DataFrame) -> str:
    """A legend label that says when the judge behind the series is not to be trusted, and when
    the judge shares model or principles with what it judges."""
    notes = []
    if problem := untrusted(group):
        notes.append(f"judge {problem}")
    if "independent" in group and (group.independent.astype(str) == "False").any():
        notes.append("judge not independent")
    if self_judged(group):
        notes.append("self-judged")
    return label + (f" ({'; '.join(notes)})" if notes else "")


def self_judged(group: pd.DataFrame, column: str = "flag") -> bool:
    """Whether any row of the group was judged by a judge with the judged model's own weights
    (its flags in `column`)."""
    return column in group and group[column].astype(str).str.contains("self_judged").any()


def checked_judges(table: pd.DataFrame) -> set[str]:
    """The judges whose margin over the trivial rules was measured: an empty flag is a verdict
    only for them (rows written before verdicts were only checked against chance)."""
    return set(table[table.metric == "agreement_minus_best_rule"].judge)


def trust_text(flag: str, checked: bool) -> str:
    """A judge's verdict as the tables write it."""
    return str(flag or "").replace("_", " ").replace(";", "; ") or (
        "validated" if checked else "above chance (no trivial-rule check)"
    )


def _style(group: pd.DataFrame, fmt: str) -> dict:
    """Series judged by an untrusted judge, or by the judged model itself: dashed and faded."""
    if untrusted(group) or self_judged(group):
        return {"fmt": fmt.replace("-", "--"), "alpha": 0.45}
    return {"fmt": fmt}


# ---------------------------------------------------------------------------------------------
# Figure 2: harmlessness Elo against helpfulness Elo, each RL run's snapshots joined in order


def judge_pairs(elo: pd.DataFrame) -> list[tuple[str, str]]:
    """(harmlessness judge, helpfulness judge) combinations present in the Elo rows; the same
    judge for both first (ai_feedback), then the PM judges, then mixed."""
    harm = sorted(set(elo[elo["eval"] == "harmlessness"].judge))
    helpful = sorted(set(elo[elo["eval"] == "helpfulness"].judge))
    pairs = [(a, b) for a in harm for b in helpful]
    return sorted(pairs, key=lambda p: (p[0] != p[1], p))


def figure2(table: pd.DataFrame, paper: dict):
    elo = elo_rows(table)
    pairs = judge_pairs(elo)
    fig, axes = plt.subplots(1, 1 + max(1, len(pairs)), figsize=(5 * (1 + max(1, len(pairs))), 4.5))
    ax = axes[0]
    for key, points in paper["fig2_elo_pareto_52B"]["series"].items():
        x, y = zip(*points, strict=True)
        ax.plot(x, y, "o-", label=_label(PAPER_SERIES[key]))
    ax.set(title="Paper (52B, crowdworkers)", xlabel="Helpfulness Elo", ylabel="Harmlessness Elo")
    ax.legend(fontsize=8)
    if not pairs:
        _empty(axes[1], "eval stage Elo rows")
    for ax, (harm_judge, help_judge) in zip(axes[1:], pairs, strict=False):
        keys = ["run_id", "model", "method", "rl_sequences"]
        harm = elo[(elo["eval"] == "harmlessness") & (elo.judge == harm_judge)]
        helpful = elo[(elo["eval"] == "helpfulness") & (elo.judge == help_judge)]
        merged = harm.merge(helpful, on=keys, suffixes=("_harm", "_help"), how="inner")
        merged = merged.assign(order=merged.rl_sequences.fillna(-1)).sort_values("order")
        several = merged.model.nunique() > 1
        for (model, method), group in merged.groupby(["model", "method"], sort=False):
            label = _label(method) + (f" ({model})" if several else "")
            style = "o-" if group.rl_sequences.notna().any() else "s"
            itself = self_judged(group, "flag_harm") or self_judged(group, "flag_help")
            if itself:  # the judge's weights are this model's: dashed, faded, said
                style, label = style.replace("-", "--"), label + " (self-judged)"
            seeds = int(group.seeds_harm.max()) if "seeds_harm" in group else 1
            drawn = ax.errorbar(
                group.value_help,
                group.value_harm,
                xerr=[group.value_help - group.low_help, group.high_help - group.value_help],
                yerr=[group.value_harm - group.low_harm, group.high_harm - group.value_harm],
                fmt=style,
                capsize=2,
                label=label + (f" (mean of {seeds} seeds)" if seeds > 1 else ""),
                alpha=0.45 if itself else 1.0,
            )
            if seeds > 1:  # each seed's own (helpfulness, harmlessness) point
                points = [
                    (help_values[s], harm_values[s])
                    for harm_values, help_values in zip(
                        group.seed_values_harm, group.seed_values_help, strict=True
                    )
                    for s in harm_values
                    if s in help_values
                ]
                ax.scatter(*zip(*points, strict=True), s=9, alpha=0.55, linewidths=0,
                           color=drawn.lines[0].get_color(), zorder=3)  # fmt: skip
        warnings = [
            f"{axis} judge {problem}"
            for axis, flags in (
                ("harmlessness", merged.flag_harm),
                ("helpfulness", merged.flag_help),
            )
            if (problem := untrusted(pd.DataFrame({"flag": flags})))
        ]
        if (merged.independent_harm.astype(str) == "False").any() or (
            merged.independent_help.astype(str) == "False"
        ).any():
            warnings.append("a judge is not independent of the training PM")
        if warnings:
            ax.text(0.02, 0.02, "; ".join(warnings), transform=ax.transAxes, fontsize=7,
                    color="firebrick")  # fmt: skip
        ax.set(
            title=f"This project: harmlessness by {harm_judge}, helpfulness by {help_judge}",
            xlabel="Helpfulness Elo",
            ylabel="Harmlessness Elo",
        )
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.suptitle("Figure 2: harmlessness vs helpfulness Elo (SL-CAI = 0; RL snapshots in order)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Figure 3: helpfulness and harmlessness Elo against parameters


def final_points(elo: pd.DataFrame) -> pd.DataFrame:
    """Each series' last point (RL: its most trained snapshot) per run and judge."""
    elo = elo.assign(order=elo.rl_sequences.fillna(-1))
    keys = ["run_id", "model", "method", "judge", "eval"]
    return elo.sort_values("order").groupby(keys, as_index=False).last()


def figure3(table: pd.DataFrame, paper: dict):
    """Paper panels; ours from the joint fit over a multirun (stage `joint`: one scale, the
    largest SL-CAI at 0) when there is one, else each run's own fit (no shared scale: said so)."""
    ref = paper["fig3_elo_vs_params"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    params = _params_of(ref["params"])
    joint = table[(table.stage == "joint") & (table.metric == "elo")]
    for col, dimension in enumerate(DIMENSIONS):
        ax = axes[0, col]
        for key in ("helpful_rlhf", "hh_rlhf"):
            ax.plot(params, ref[key][dimension], "o-", label=_label(key))
        for key, marker in (("sl_cai_52B", "s"), ("rl_cai_52B", "^"), ("rl_cai_cot_52B", "v")):
            ax.plot([52e9], [ref[key][dimension]], marker, label=_label(key.removesuffix("_52B")))
        ax.set(xscale="log", title=f"Paper: {dimension} Elo", xlabel="Parameters", ylabel="Elo")
        ax.legend(fontsize=7)
        source = joint if not joint.empty else elo_rows(table)
        ours = final_points(source)
        ours = ours[(ours["eval"] == dimension) & ours.parameters.notna()]
        ax = axes[1, col]
        if ours.empty:
            _empty(ax, f"{dimension} Elo rows")
            continue
        for (method, judge), group in ours.groupby(["method", "judge"]):
            group = group.sort_values("parameters")
            _with_interval(ax, group.parameters, group, f"{_label(method)} [{judge}]", "o-")
        scale = (
            "one joint fit, largest SL-CAI = 0"
            if not joint.empty
            else "each size's own SL-CAI = 0: no shared scale (make_figures.py --joint)"
        )
        ax.set(
            xscale="log",
            title=f"This project: {dimension} Elo ({scale})",
            xlabel="Parameters",
            ylabel="Elo",
        )
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    fig.suptitle("Figure 3: Elo against model size")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Figure 4: HHH accuracy against parameters


HHH_SERIES = {  # (stage, method) of our rows -> the paper series it corresponds to
    ("eval_hhh", "zero_shot"): "pretrained_lm",
    ("eval_hhh", "cot"): "chain_of_thought",
    ("eval_hhh", "cot_ensemble"): "ensembled_cot",
    # the paper's "PM trained on human feedback" saw helpfulness and harmlessness data; ours
    # are harmlessness-only judges, so they are named for what they are, not as the paper's
    ("judge", "pm_harmless-base"): "pm_human_harmlessness",
    ("judge", "pm_paper_pm"): "pm_paper_labels",
    ("judge", "pm_paper_pm+harmless-base"): "pm_paper_and_human",
    ("pm", "pm_ai"): "pm_ai_feedback",
    # the HH-RLHF baseline's training PM (pm.harmlessness=human): human harmlessness comparisons,
    # helpfulness by AI labels offline (the paper's had human helpfulness too)
    ("pm", "pm_human"): "pm_human_feedback",
}
HHH_LABELS = {
    "pretrained_lm": "Pretrained LM",
    "chain_of_thought": "Chain of thought",
    "ensembled_cot": "Ensembled CoT",
    "hh_pm_human_feedback": "PM, human feedback (helpful + harmless)",
    "pm_human_harmlessness": "Judge PM, human harmlessness data only",
    "pm_paper_labels": "Judge PM, paper-PM labels (harmlessness prompts)",
    "pm_paper_and_human": "Judge PM, paper-PM labels + human harmlessness",
    "pm_ai_feedback": "PM, AI feedback (RL-CAI's)",
    "pm_human_feedback": "PM, human harmlessness feedback (HH-RLHF's)",
}


def figure4(table: pd.DataFrame, paper: dict):
    ref = paper["fig4_hhh_accuracy_438"]
    fig, ax = plt.subplots(figsize=(7, 5))
    palette = dict(zip(HHH_LABELS, sns.color_palette(n_colors=len(HHH_LABELS)), strict=True))
    params = _params_of(ref["params"])
    for key in ("pretrained_lm", "chain_of_thought", "ensembled_cot", "hh_pm_human_feedback"):
        ax.plot(
            params, ref[key], "--", color=palette[key], alpha=0.7, label=f"Paper: {HHH_LABELS[key]}"
        )
    hhh = table[(table["eval"] == "hhh") & (table.metric == "accuracy") & table.parameters.notna()]
    for (stage, method), series in HHH_SERIES.items():
        group = hhh[(hhh.stage == stage) & (hhh.method == method)]
        if group.empty:
            continue
        group = group.groupby("parameters", as_index=False)[["value", "low", "high", "n"]].mean()
        _with_interval(
            ax,
            group.parameters,
            group,
            f"Ours: {HHH_LABELS[series]} (n={int(group.n.max())})",
            "o",
            color=palette[series],
        )
    if hhh.empty:
        ax.text(0.03, 0.05, "no HHH rows of ours yet", transform=ax.transAxes)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="Parameters", ylabel="HHH accuracy (438 binary comparisons)")
    ax.set_title("Figure 4: HHH evaluations against model size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Figure 5: PM scores against the number of revisions


FIG5_JUDGES = {"harmlessness": "pm_harmlessness", "helpfulness": "pm_helpfulness", "hh": "pm_hh"}
FIG5_OURS = {  # what our series is: the paper's HH PM is one PM; ours is the sum of two judges
    "harmlessness": "harmlessness judge PM",
    "helpfulness": "helpfulness judge PM",
    "hh": "sum of the harmlessness and helpfulness judges (not one HH PM)",
}


def figure5(table: pd.DataFrame, paper: dict):
    ref = paper["fig5_pm_score_vs_revisions"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    revisions = ref["revisions"]
    ours = table[(table.method == "sl_revision") & (table.metric == "pm_score")]
    for col, (key, judge) in enumerate(FIG5_JUDGES.items()):
        ax = axes[0, col]
        for size, values in ref[key].items():
            ax.plot(revisions, values, "o-", label=size)
        ax.set(title=f"Paper: {key} PM score", xlabel="Number of revisions", ylabel="PM score")
        ax.legend(fontsize=7, title="size")
        ax = axes[1, col]
        mine = ours[ours.judge == judge]
        if mine.empty:
            _empty(
                ax,
                f"{judge} scores of revisions"
                + (
                    " (needs a helpfulness judge: judge.helpfulness=helpful-base)"
                    if key != "harmlessness"
                    else ""
                ),
            )
            continue
        for (model, params), group in mine.groupby(["model", "parameters"], dropna=False):
            group = group.groupby("revisions", as_index=False)[["value", "low", "high"]].mean()
            label = f"{model}" + (f" ({_params_label(params)})" if params == params else "")
            _with_interval(ax, group.revisions, group, label, "o-")
        ax.set(
            title=f"This project: {FIG5_OURS[key]} ({judge})",
            xlabel="Number of revisions",
            ylabel="PM score",
        )
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.suptitle("Figure 5: PM scores of the SL-CAI revisions")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Figures 6 and 7: the SL ablations (numbers of principles; critiques against direct revisions)


def _revision_lines(ax, rows: pd.DataFrame, label_of) -> None:
    for (method, model), group in rows.groupby(["method", "model"]):
        group = group.groupby("revisions", as_index=False)[["value", "low", "high"]].mean()
        _with_interval(ax, group.revisions, group, f"{label_of(method)} ({model})", "o-")
    ax.set(xlabel="Number of revisions", ylabel="Harmlessness PM score (pm_harmlessness)")
    ax.legend(fontsize=7)


def _principles(method: str) -> str:
    suffix = method.removeprefix("sl_revision").removeprefix("_direct")
    return (
        f"{suffix.removeprefix('_p')} principles" if suffix.startswith("_p") else "all principles"
    )


def figure6(table: pd.DataFrame, paper: dict):
    rows = table[
        table.method.str.match(r"^sl_revision(_p\d+)?$")
        & (table.metric == "pm_score")
        & (table.judge == "pm_harmlessness")
    ]
    fig, ax = plt.subplots(figsize=(7, 5))
    if rows.empty:
        _empty(ax, "revision scores (python src/train.py -m experiment=fig6_principles)")
    else:
        _revision_lines(ax, rows, _principles)
    ax.set_title(
        "Figure 6: harmlessness PM score of revisions by number of principles\n"
        "(this project; the paper's values are not digitised here: see Bai et al. 2022, Fig. 6)"
    )
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return fig


def figure7(table: pd.DataFrame, paper: dict):
    rows = table[
        table.method.isin(["sl_revision", "sl_revision_direct"])
        & (table.metric == "pm_score")
        & (table.judge == "pm_harmlessness")
    ]
    fig, ax = plt.subplots(figsize=(7, 5))
    if rows.empty:
        _empty(ax, "revision scores (python src/train.py -m experiment=fig7_critique_vs_direct)")
    else:
        _revision_lines(
            ax, rows, lambda m: "direct revision" if m.endswith("direct") else "critiqued revision"
        )
    ax.set_title(
        "Figure 7: critiqued against direct revisions\n"
        "(this project; the paper's values are not digitised here: see Bai et al. 2022, Fig. 7)"
    )
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Figure 8: Elo against RL training sequences


def figure8(table: pd.DataFrame, paper: dict):
    sequences = paper["fig8_rl_training_sequences_millions"]
    series = paper["fig2_elo_pareto_52B"]["series"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    elo = elo_rows(table)
    elo = elo[elo.rl_sequences.notna()]
    for col, dimension in enumerate(DIMENSIONS):
        ax = axes[0, col]
        for key, points in series.items():
            ax.plot(sequences[key], [p[col] for p in points], "o-", label=_label(PAPER_SERIES[key]))
        ax.set(
            title=f"Paper: {dimension} Elo",
            xlabel="RL training sequences (millions)",
            ylabel="Elo",
        )
        ax.legend(fontsize=7)
        ax = axes[1, col]
        mine = elo[elo["eval"] == dimension]
        if mine.empty:
            _empty(ax, f"{dimension} Elo of RL snapshots")
            continue
        for (_run, method, judge), group in mine.groupby(["run_id", "method", "judge"]):
            group = group.sort_values("rl_sequences")
            _with_interval(ax, group.rl_sequences, group, f"{_label(method)} [{judge}]", "o-")
        ax.set(
            title=f"This project: {dimension} Elo",
            xlabel="RL training sequences (DPO: training pairs)",
            ylabel="Elo",
        )
        ax.legend(fontsize=7)
    fig.suptitle("Figure 8: Elo against RL training sequences")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Figure 9: calibration of the HHH evaluations (reliability of the stated probabilities)


def figure9(table: pd.DataFrame, paper: dict, calibration: pd.DataFrame | None = None):
    """Reliability diagram of the eval_hhh stage's HHH answers (calibration.csv rows: eval,
    method, bin low/high, n, mean confidence, accuracy): perfect calibration on the diagonal."""
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0.5, 1.0], [0.5, 1.0], ":", color="grey", label="perfect calibration")
    rows = calibration[calibration["eval"] == "hhh"] if calibration is not None else None
    if rows is None or rows.empty:
        _empty(ax, "calibration rows (eval_hhh stage: results/runs/*calibration*.csv)")
    else:
        group_keys = [k for k in ("model", "method") if k in rows]
        for keys, group in rows.groupby(group_keys):
            keys = keys if isinstance(keys, tuple) else (keys,)
            group = group.groupby(["low", "high"], as_index=False).apply(
                lambda g: pd.Series(
                    {
                        "confidence": (g.confidence * g.n).sum() / g.n.sum(),
                        "accuracy": (g.accuracy * g.n).sum() / g.n.sum(),
                        "n": g.n.sum(),
                    }
                )
            )
            label = " ".join(str(k) for k in keys) + f" (n={int(group.n.sum())})"
            ax.plot(group.confidence, group.accuracy, "o-", label=label)
        ax.legend(fontsize=7)
    ax.set(
        xlabel="Probability of the chosen option",
        ylabel="Frequency correct",
        xlim=(0.45, 1.02),
        ylim=(0.0, 1.02),
    )
    ax.set_title(
        "Figure 9: calibration of the HHH evaluations\n(this project; the paper's 52B curve is not "
        "digitised here: see Bai et al. 2022, Fig. 9)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Judge validation: agreement with the paper's PM, scores per paper model, per paper revision


def validation_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["eval"].isin(["palms_test", "palms_answers", "palms_revisions"])]


def figure_validation(table: pd.DataFrame, paper: dict):
    rows = validation_rows(table)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    agreement = judge_agreement(rows)
    ax = axes[0]
    if agreement.empty:
        _empty(ax, "judge validation rows (judge and eval stages)")
    else:
        agreement = agreement.groupby(["judge", "stage", "model"], as_index=False).last()
        labels = [f"{r.judge}\n({r.stage})" for r in agreement.itertuples()]
        checked = checked_judges(rows)
        colours = [
            "firebrick" if untrusted(pd.DataFrame([r._asdict()]))
            else "seagreen" if r.judge in checked
            else "grey"  # rows written before the trivial-rule check: no verdict
            for r in agreement.itertuples()
        ]  # fmt: skip
        ax.bar(range(len(agreement)), agreement.value, color=colours, alpha=0.8)
        ax.errorbar(
            range(len(agreement)),
            agreement.value,
            yerr=[agreement.value - agreement.low, agreement.high - agreement.value],
            fmt="none",
            color="black",
            capsize=3,
        )
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_xticks(range(len(agreement)), labels, fontsize=7)
        ax.set(ylim=(0, 1), ylabel="Agreement with the paper's PM")
    ax.set_title("Pairs of the paper's answers ordered as its PM orders them\n"
                 "(held-out PALMS prompts; red: not validated; grey: no trivial-rule check)",
                 fontsize=9)  # fmt: skip
    ax = axes[1]
    by_type = rows[(rows["eval"] == "palms_answers") & (rows.metric == "pm_score")]
    if by_type.empty:
        _empty(ax, "scores of the paper's answers")
    else:
        order = ["helpful_rlhf", "hh_rlhf", "rl_cai", "rl_cai_cot"]
        for judge, group in by_type.groupby("judge"):
            group = group.groupby("method", as_index=False)[["value"]].mean()
            group = group.set_index("method").reindex(order).dropna().reset_index()
            z = (group.value - group.value.mean()) / (group.value.std() or 1.0)
            problem = untrusted(agreement[agreement.judge == judge]) if not agreement.empty else ""
            label = judge + (f" (judge {problem})" if problem else "")
            ax.plot([_label(m) for m in group.method], z, "o-", label=label)
        ax.legend(fontsize=7)
        ax.set(ylabel="Mean score, standardised across the four models")
    ax.set_title("Mean score of the paper's answers per 52B model\n(paper_pm_52b: the paper's PM)",
                 fontsize=9)  # fmt: skip
    ax.tick_params(axis="x", labelsize=7)
    ax = axes[2]
    chains = rows[(rows["eval"] == "palms_revisions") & (rows.metric == "pm_score")]
    if chains.empty:
        _empty(ax, "scores of the paper's revisions")
    else:
        for (judge, stage), group in chains.groupby(["judge", "stage"]):
            group = group.groupby("revisions", as_index=False)[["value", "low", "high"]].mean()
            mine = agreement[agreement.judge == judge] if not agreement.empty else agreement
            group["flag"] = ";".join(mine.flag) if "flag" in mine else ""
            _with_interval(ax, group.revisions, group, f"{judge} ({stage})", "o-")
        ax.legend(fontsize=7)
        ax.set(xlabel="Revision of the paper's SL-CAI chains", ylabel="Judge score")
    ax.set_title("The paper's critique -> revision chains scored by our judges\n"
                 "(a harmlessness judge that works scores them rising)", fontsize=9)  # fmt: skip
    fig.suptitle("Judge validation on the paper's released PALMS samples")
    fig.tight_layout()
    return fig


def judge_agreement(rows: pd.DataFrame, metric: str = "agreement_paper_pm") -> pd.DataFrame:
    """Each judge's own agreement rows (not the trivial rules measured beside it)."""
    return rows[(rows.metric == metric) & (rows.method != "trivial_rule")]


def _agreement_cell(rows: pd.DataFrame) -> str:
    if rows.empty:
        return "-"
    r = rows.iloc[-1]
    return f"{r.value:.3f} [{r.low:.3f}, {r.high:.3f}]"


def validation_table(table: pd.DataFrame) -> str:
    """Markdown: each judge's agreement with the paper's PM beside the trivial rules it must
    beat (on all pairs, length-matched pairs, pairs from one paper model), its margin over the
    best rule and verdict; its scores per paper model and per paper revision."""
    rows = validation_rows(table)
    lines = ["# Judge validation on the paper's released PALMS samples", ""]
    agreement = judge_agreement(rows)
    if agreement.empty:
        return "\n".join([*lines, "No validation rows yet (run the judge and eval stages).", ""])
    lines += [
        "Agreement with the paper's 52B PM over pairs of the paper's answers to the same "
        "held-out prompt (95% bootstrap interval over prompts; 0.5 is chance), on all pairs, on "
        "length-matched pairs (word counts within 20%) and on pairs from one paper model; the "
        "judge's margin over the best trivial rule on the same pairs (paired bootstrap over "
        "prompts). Verdict: `validated` only when that margin's interval lies above 0.",
        "",
        "| judge | stage | backbone | agreement | length-matched | within one model | pairs "
        "| best rule | judge - best rule | verdict | independent |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in agreement.itertuples():
        mine = rows[(rows.judge == r.judge) & (rows.stage == r.stage) & (rows.model == r.model)]
        margin = mine[mine.metric == "agreement_minus_best_rule"]
        best, difference = "-", "-"
        if not margin.empty:
            m = margin.iloc[-1]
            rule = rows[(rows.judge == m.method) & (rows.metric == "agreement_paper_pm")]
            rule = rule[(rule.run_id == r.run_id) & (rule.n == r.n)]
            best = f"{m.method}: {_agreement_cell(rule)}"
            difference = f"{m.value:+.3f} [{m.low:+.3f}, {m.high:+.3f}]"
        verdict = trust_text(r.flag, not margin.empty)
        independent = "-" if pd.isna(r.independent) else r.independent
        lines.append(
            f"| {r.judge} | {r.stage} | {r.model} | {r.value:.3f} [{r.low:.3f}, {r.high:.3f}] "
            f"| {_agreement_cell(mine[mine.metric == 'agreement_paper_pm_length_matched'])} "
            f"| {_agreement_cell(mine[mine.metric == 'agreement_paper_pm_within_model'])} "
            f"| {int(r.n)} | {best} | {difference} | {verdict} | {independent} |"
        )
    rules = rows[rows.method == "trivial_rule"]
    if not rules.empty:
        lines += ["", "The trivial rules on the same pairs (one line per set of pairs; "
                  "model_type_oracle, each answer scored by its paper model's mean paper-PM "
                  "score, is a ceiling, not a rule to beat):", "",
                  "| rule | pairs | agreement | length-matched | within one model |",
                  "|---|---|---|---|---|"]  # fmt: skip
        everything = rules[rules.metric == "agreement_paper_pm"].drop_duplicates(["judge", "n"])
        for r in everything.itertuples():
            same = rules[(rules.judge == r.judge) & (rules.stage == r.stage)]
            same = same[same.run_id == r.run_id]
            lines.append(
                f"| {r.judge} | {int(r.n)} | {r.value:.3f} [{r.low:.3f}, {r.high:.3f}] "
                f"| {_agreement_cell(same[same.metric == 'agreement_paper_pm_length_matched'])} "
                f"| {_agreement_cell(same[same.metric == 'agreement_paper_pm_within_model'])} |"
            )
    by_type = rows[(rows["eval"] == "palms_answers") & (rows.metric == "pm_score")]
    if not by_type.empty:
        pivot = by_type.pivot_table(index="judge", columns="method", values="value")
        order = [m for m in ("helpful_rlhf", "hh_rlhf", "rl_cai", "rl_cai_cot") if m in pivot]
        lines += ["", "Mean score of the paper's answers per model (paper_pm_52b: the paper's own "
                  "PM on the same answers):", "",
                  "| judge | " + " | ".join(_label(m) for m in order) + " |",
                  "|---|" + "---|" * len(order)]  # fmt: skip
        for judge, values in pivot.iterrows():
            lines.append(f"| {judge} | " + " | ".join(f"{values[m]:+.3f}" for m in order) + " |")
    chains = rows[(rows["eval"] == "palms_revisions") & (rows.metric == "pm_score")]
    if not chains.empty:
        pivot = chains.pivot_table(index="judge", columns="revisions", values="value")
        lines += ["", "Mean score of the paper's SL-CAI chains per revision (0 = initial answer):",
                  "", "| judge | " + " | ".join(str(int(c)) for c in pivot.columns) + " |",
                  "|---|" + "---|" * len(pivot.columns)]  # fmt: skip
        for judge, values in pivot.iterrows():
            lines.append(f"| {judge} | " + " | ".join(f"{v:+.3f}" for v in values) + " |")
    return "\n".join([*lines, ""])


# ---------------------------------------------------------------------------------------------
# The Elo table and writing everything


def elo_table(table: pd.DataFrame, paper: dict) -> str:
    """Markdown: our Elo per model and judge with 95% intervals; the paper's final 52B points."""
    lines = ["# Elo ratings", ""]
    if "seeds" not in table:  # not pooled yet (draw_all pools once for every figure)
        table = pool_over_seeds(table)
    elo = elo_rows(table)
    if elo.empty:
        lines += ["No Elo rows in the results yet (run the eval stage).", ""]
    else:
        lines += [
            "This project (SL-CAI of each run = 0; 95% bootstrap intervals over prompts; a row "
            "of several seeds is their mean, its interval including the seed-to-seed spread: "
            "cai.analysis.pooling). `holds`: every seed (all seeds on one side of 0), pooled "
            "interval (it excludes 0), no, or one seed (no finding from one draw). `trust`: the "
            "judge's verdict (cai.eval.validation: at chance / below chance: its agreement with "
            "the paper's PM reaches or lies below 0.5; not above <rule>: it does not beat that "
            "trivial rule); never loses: the rating comes from the fit's prior, not from data; "
            "self judged: the judge shares weights with the judged model; `independent`: the "
            "judge shares no model, principles or data with the PM that trained the judged "
            "models.",
            "",
            "| model | series | RL sequences | judge | dimension | Elo | 95% interval | comparisons "
            "| seeds | holds | trust | independent |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        series = {name: i for i, name in enumerate(LABELS)}  # helpful, SL-CAI, RL runs, ...
        ordered = elo.assign(
            order=elo.rl_sequences.fillna(-1), series=elo.method.map(series).fillna(len(series))
        ).sort_values(["model", "judge", "eval", "series", "method", "order"])
        checked = checked_judges(table)
        for r in ordered.itertuples():
            seq = "" if pd.isna(r.rl_sequences) else str(int(r.rl_sequences))
            trust = trust_text(r.flag, r.judge in checked)
            seeds = int(getattr(r, "seeds", 1) or 1)
            seeds_cell = (
                f"{seeds}: " + ", ".join(f"{v:+.0f}" for v in (r.seed_values or {}).values())
                if seeds > 1
                else ("1" if not pd.isna(getattr(r, "seed", math.nan)) else "-")
            )
            lines.append(
                f"| {r.model} | {_label(r.method)} | {seq} | {r.judge} | {r.eval} | "
                f"{r.value:+.0f} | [{r.low:+.0f}, {r.high:+.0f}] | {int(r.n)} | {seeds_cell} | "
                f"{holds(pd.Series(r._asdict()))} | {trust} | {r.independent} |"
            )
        lines.append("")
    lines += [
        "Paper (52B, crowdworkers; last snapshot of each series in Figure 2, read off the figure):",
        "",
        "| series | helpfulness Elo | harmlessness Elo |",
        "|---|---|---|",
    ]
    for key, points in paper["fig2_elo_pareto_52B"]["series"].items():
        lines.append(f"| {_label(PAPER_SERIES[key])} | {points[-1][0]:+d} | {points[-1][1]:+d} |")
    lines += ["", f"Source: {paper['_about']}", ""]
    return "\n".join(lines)


FIGURES = {
    "fig2_pareto": figure2,
    "fig3_scaling": figure3,
    "fig4_hhh": figure4,
    "fig5_revisions": figure5,
    "fig6_principles": figure6,
    "fig7_critique_vs_direct": figure7,
    "fig8_rl_sequences": figure8,
    "fig9_calibration": figure9,
    "judge_validation": figure_validation,
}


# ---------------------------------------------------------------------------------------------
# The known-signal check (experiment=signal_check; not a figure of the paper)


def figure_signal_check(history: list[dict], table: pd.DataFrame):
    """PPO's training-PM score, the rule's own metric and KL against RL training sequences
    (`history`: the ppo stage's metrics per iteration), beside what the eval stage measured on
    held-out prompts for every snapshot of PPO and DPO (`table`: that run's result rows): the
    share of answers that end before the token limit and the Elo under the rule judge and the PM
    judge, SL-CAI at 0."""
    steps = pd.DataFrame(history)
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    ax = axes[0, 0]
    x = steps["train/sequences"]
    ax.plot(x, steps["objective/scores"], "o-", label="all rollouts")
    for kind in ("red_team", "helpful"):
        if f"objective/scores_{kind}" in steps:
            ax.plot(x, steps[f"objective/scores_{kind}"], ".--", label=kind)
    if "objective/score_gain" in steps:  # less SL-CAI's own answers to the same prompts
        ax.plot(x, steps["objective/score_gain"], "s-", label="gain over SL-CAI, same prompts")
    ax.set(title="PPO: training-PM score of the rollouts", xlabel="RL training sequences",
           ylabel="PM score")  # fmt: skip
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    ended = steps["val/num_eos_tokens"] / steps["train/sequences"].diff().fillna(
        steps["train/sequences"].iloc[0]
    )
    ax.plot(x, ended, "o-", label="PPO rollouts (training prompts)")
    rows = table[(table.stage == "eval") & (table.metric == "ended_rate")]
    for method, group in rows.groupby("method"):
        for kind, part in group.groupby("eval"):
            part = part.sort_values("rl_sequences")
            _with_interval(ax, part.rl_sequences, part, f"{_label(method)}, held out {kind}", ".:")
    ax.set(title="Rule metric: answers that end (not cut off)", xlabel="RL training sequences "
           "(DPO: training pairs)", ylabel="share of answers", ylim=(-0.05, 1.05))  # fmt: skip
    ax.legend(fontsize=6)
    ax = axes[1, 0]
    ax.plot(x, steps["objective/kl"], "o-")
    ax.set(title="PPO: KL(policy || SL-CAI) per answer", xlabel="RL training sequences",
           ylabel="nats")  # fmt: skip
    ax = axes[1, 1]
    elo = elo_rows(table)
    elo = elo[elo.rl_sequences.notna()]
    for (method, judge, dimension), group in elo.groupby(["method", "judge", "eval"]):
        group = group.sort_values("rl_sequences")
        label = f"{_label(method)} [{judge}, {dimension}]"
        _with_interval(ax, group.rl_sequences, group, label, "o-" if judge == "rule" else "s--")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="Elo of the RL snapshots (SL-CAI = 0)", xlabel="RL training sequences (DPO: "
           "training pairs)", ylabel="Elo")  # fmt: skip
    ax.legend(fontsize=6)
    fig.suptitle("Signal check (known-signal rule, not the paper's method)")
    fig.tight_layout()
    return fig


def draw_all(
    table: pd.DataFrame, out_dir: str | Path, calibration: pd.DataFrame | None = None
) -> list[Path]:
    """Every figure as PNG and PDF, elo_table.md and judge_validation.md in `out_dir`; returns
    the files written. `calibration`: the HHH reliability rows (Figure 9)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paper = paper_reference()
    table = pool_over_seeds(table)  # one row per measurement and replicate, seeds inside
    sns.set_theme(style="whitegrid", context="paper")
    written = []
    for name, draw in FIGURES.items():
        fig = draw(table, paper, calibration) if draw is figure9 else draw(table, paper)
        for suffix in ("png", "pdf"):
            path = out / f"{name}.{suffix}"
            with atomic_path(path) as tmp:  # never a half-written figure
                fig.savefig(tmp, dpi=150, format=suffix)
            written.append(path)
        plt.close(fig)
    write_text_atomic(out / "elo_table.md", elo_table(table, paper))
    write_text_atomic(out / "judge_validation.md", validation_table(table))
    written += [out / "elo_table.md", out / "judge_validation.md"]
    return written


def make_figures(results_dir: str | Path, figures_dir: str | Path, extra=()) -> list[Path]:
    """Gather every result row under `results_dir` (and `extra` folders) into
    results_dir/all_results.csv, then draw every figure from that table into `figures_dir`."""
    table = gather(results_dir, extra)
    log.info("%d result rows gathered from %s", len(table), results_dir)
    return draw_all(table, figures_dir, gather_calibration(results_dir, extra))


__all__ = ["FIGURES", "draw_all", "elo_table", "make_figures", "paper_reference"]
