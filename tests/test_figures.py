"""Figures and the results table: each figure draws from a small hand-made table (and from an
empty one), the Elo table lists every rating, gathering deduplicates and skips other CSVs."""

import matplotlib.pyplot as plt
import pytest

from cai.analysis.figures import FIGURES, draw_all, elo_table, paper_reference
from cai.analysis.gather import as_table, gather
from cai.results import read_rows, row, write_csv, write_rows


def hand_made_rows() -> list[dict]:
    rows = []
    common = {
        "stage": "eval",
        "run_id": "r1",
        "model": "m135",
        "parameters": 135e6,
        "metric": "elo",
    }
    for judge in ("ai_feedback", "pm_harmlessness"):
        for dimension in ("harmlessness", "helpfulness"):
            if judge == "pm_harmlessness" and dimension == "helpfulness":
                continue
            for method, seq, value in (
                ("helpful", None, -40.0),
                ("sl_cai", None, 0.0),
                ("rl_cai", 0, 0.0),
                ("rl_cai", 16, 25.0),
                ("rl_cai", 32, 60.0),
            ):
                rows.append(
                    row(
                        **common,
                        eval=dimension,
                        judge=judge,
                        method=method,
                        rl_sequences=seq,
                        value=value,
                        low=value - 10,
                        high=value + 10,
                        n=40,
                    )
                )
    for method in ("sl_revision", "sl_revision_direct", "sl_revision_p2"):
        for n, value in enumerate([-0.5, 0.1, 0.3]):
            rows.append(
                row(
                    stage="eval",
                    run_id="r1",
                    model="m135",
                    parameters=135e6,
                    eval="red_team_sl",
                    method=method,
                    judge="pm_harmlessness",
                    revisions=n,
                    metric="pm_score",
                    value=value,
                    low=value - 0.1,
                    high=value + 0.1,
                    n=64,
                )
            )
    rows.append(
        row(
            stage="eval_hhh",
            run_id="r2",
            model="m135",
            parameters=135e6,
            eval="hhh",
            method="zero_shot",
            metric="accuracy",
            value=0.53,
            low=0.48,
            high=0.57,
            n=438,
        )
    )
    rows.append(
        row(
            stage="judge",
            run_id="r3",
            model="m135",
            parameters=135e6,
            eval="hhh",
            method="pm_human",
            judge="pm_harmlessness",
            metric="accuracy",
            value=0.6,
            low=0.55,
            high=0.65,
            n=438,
        )
    )
    return rows


@pytest.mark.parametrize("name", list(FIGURES))
def test_each_figure_draws_ours_beside_the_papers(name):
    rows = hand_made_rows() + (flagged_rows() if name == "judge_validation" else [])
    fig = FIGURES[name](as_table(rows), paper_reference())
    lines = sum(len(ax.lines) for ax in fig.axes)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert len(fig.axes) >= 1 and lines > 0
    titles = " ".join(ax.get_title() for ax in fig.axes) + " ".join(
        str(h.get_label()) for ax in fig.axes for h in ax.get_legend_handles_labels()[0]
    )
    assert "paper" in titles.lower()
    # fig5's helpfulness panels need a helpfulness judge; fig9 and the validation figure draw
    # other tables (test_figure9_..., test_our_series_carry_our_values_and_the_judges_trust)
    if name not in ("fig5_revisions", "fig9_calibration"):
        assert not any(t.startswith("no rows yet") for t in texts), texts
    plt.close(fig)


@pytest.mark.parametrize("name", list(FIGURES))
def test_each_figure_draws_the_paper_alone_from_an_empty_table(name):
    fig = FIGURES[name](as_table([]), paper_reference())
    if name in (
        "fig6_principles",
        "fig7_critique_vs_direct",
        "fig9_calibration",
        "judge_validation",
    ):
        # no digitised paper values: the panel says what is missing
        assert any(t.get_text().startswith("no rows yet") for ax in fig.axes for t in ax.texts)
    else:
        assert sum(len(ax.lines) for ax in fig.axes) > 0
    plt.close(fig)


def test_elo_table_lists_each_rating_and_the_paper():
    text = elo_table(as_table(hand_made_rows()), paper_reference())
    assert "| m135 | RL-CAI | 32 | ai_feedback | harmlessness | +60 | [+50, +70] | 40 |" in text
    assert "| RL-CAI w/ CoT | +85 | +190 |" in text  # the paper's last Figure 2 point
    assert "Bai et al. 2022" in text


def test_gather_deduplicates_and_skips_other_csvs(tmp_path):
    rows = hand_made_rows()
    write_rows(tmp_path / "runs" / "a.csv", rows)
    write_rows(tmp_path / "runs" / "b.csv", rows[:3])  # a second run reusing an artifact
    write_csv(tmp_path / "calibration.csv", [{"bin": 1, "accuracy": 0.5}], ["bin", "accuracy"])
    table = gather(tmp_path)
    assert len(table) == len(rows)
    assert len(read_rows(tmp_path / "all_results.csv")) == len(rows)
    assert len(gather(tmp_path)) == len(rows)  # the gathered table itself is not read back


def test_draw_all_writes_png_pdf_and_the_table(tmp_path):
    written = draw_all(as_table(hand_made_rows()), tmp_path)
    assert {p.suffix for p in written} == {".png", ".pdf", ".md"}
    assert len(written) == 2 * len(FIGURES) + 2  # + elo_table.md, judge_validation.md
    assert not list(tmp_path.glob(".*.tmp"))


def _ours(fig, label_start: str):
    """(label, x, y) of our errorbar series whose label starts with `label_start`."""
    found = []
    for ax in fig.axes:
        for container in ax.containers:
            label = str(container.get_label())
            if label.startswith(label_start) and container.lines[0] is not None:
                line = container.lines[0]
                found.append((label, list(line.get_xdata()), list(line.get_ydata())))
    return found


def flagged_rows() -> list[dict]:
    """The hand-made rows with the PM judge at chance and the AI judge not independent, plus
    validation, joint-fit and revision rows."""
    rows = []
    for r in hand_made_rows():
        if r["judge"] == "pm_harmlessness":
            r = {**r, "flag": "at_chance", "independent": True}
        elif r["judge"] == "ai_feedback":
            r = {**r, "independent": False}
        rows.append(r)
    for model, params, value in (("small", 1e8, -30.0), ("big", 1e9, 0.0)):
        rows.append(row(stage="joint", run_id=model, model=model, parameters=params,
                        eval="harmlessness", method="sl_cai", judge="pm_harmlessness",
                        metric="elo", value=value, low=value - 5, high=value + 5, n=10))  # fmt: skip
    for judge, stage, value, low, flag in (
        ("pm_harmlessness", "judge", 0.66, 0.61, "not_above_shorter_wins"),
        ("ai_feedback", "eval", 0.51, 0.45, "at_chance"),
    ):
        rows.append(row(stage=stage, run_id="v", model="m135", eval="palms_test",
                        method="agreement", judge=judge, metric="agreement_paper_pm",
                        value=value, low=low, high=value + 0.05, n=500, flag=flag))  # fmt: skip
    # beside the PM judge, on its pairs: the rule it does not beat, and its margin over it
    rows.append(row(stage="judge", run_id="v", model="m135", eval="palms_test",
                    method="trivial_rule", judge="shorter_wins", metric="agreement_paper_pm",
                    value=0.64, low=0.60, high=0.68, n=500))  # fmt: skip
    rows.append(row(stage="judge", run_id="v", model="m135", eval="palms_test",
                    method="trivial_rule", judge="shorter_wins",
                    metric="agreement_paper_pm_length_matched", value=0.55, low=0.5, high=0.6,
                    n=200))  # fmt: skip
    rows.append(row(stage="judge", run_id="v", model="m135", eval="palms_test",
                    method="shorter_wins", judge="pm_harmlessness",
                    metric="agreement_minus_best_rule", value=0.02, low=-0.01, high=0.05, n=500,
                    flag="not_above_shorter_wins"))  # fmt: skip
    for method, value in (("helpful_rlhf", 1.0), ("rl_cai", 2.0), ("rl_cai_cot", 0.5)):
        for judge in ("pm_harmlessness", "paper_pm_52b"):
            rows.append(row(stage="judge", run_id="v", model="m135", eval="palms_answers",
                            method=method, judge=judge, metric="pm_score", value=value, n=8))  # fmt: skip
    for n in range(5):
        rows.append(row(stage="judge", run_id="v", model="m135", eval="palms_revisions",
                        method="paper_sl_cai", judge="pm_harmlessness", revisions=n,
                        metric="pm_score", value=0.1 * n, low=0.1 * n - 0.05,
                        high=0.1 * n + 0.05, n=18))  # fmt: skip
    return rows


def test_our_series_carry_our_values_and_the_judges_trust():
    table = as_table(flagged_rows())
    paper = paper_reference()
    fig8 = FIGURES["fig8_rl_sequences"](table, paper)
    (label, x, y), *_ = _ours(fig8, "RL-CAI [pm_harmlessness]")
    assert x == [0, 16, 32] and y == [0.0, 25.0, 60.0]
    assert "judge at chance" in label
    (label, _, _), *_ = _ours(fig8, "RL-CAI [ai_feedback]")
    assert "judge not independent" in label and "at chance" not in label
    fig3 = FIGURES["fig3_scaling"](table, paper)
    (label, x, y), *_ = _ours(fig3, "SL-CAI [pm_harmlessness]")
    assert x == [1e8, 1e9] and y == [-30.0, 0.0]  # from the joint fit, not per-run rows
    assert "one joint fit" in " ".join(ax.get_title() for ax in fig3.axes)
    validation = FIGURES["judge_validation"](table, paper)
    heights = [p.get_height() for p in validation.axes[0].patches]
    assert heights == pytest.approx([0.51, 0.66])  # ai_feedback, pm_harmlessness (sorted)
    (label, x, y), *_ = _ours(validation, "pm_harmlessness (judge)")
    assert y == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    for fig in (fig8, fig3, validation):
        plt.close(fig)


def test_figure5_draws_the_hh_panel_from_the_summed_judges():
    """The HH panel draws the pm_hh rows (the sum of both judges), values as given; without
    them it says so, and only then."""
    rows = [
        row(stage="eval", run_id="e", model="m135", parameters=135e6, eval="red_team",
            method="sl_revision", judge=judge, revisions=n, metric="pm_score",
            value=base + n, low=base + n - 0.1, high=base + n + 0.1, n=16)
        for judge, base in (("pm_harmlessness", 1.0), ("pm_helpfulness", 2.0), ("pm_hh", 3.0))
        for n in range(3)
    ]  # fmt: skip
    fig = FIGURES["fig5_revisions"](as_table(rows), paper_reference())
    hh_panel = fig.axes[5]  # second row, third column
    assert "sum of the harmlessness and helpfulness judges" in hh_panel.get_title()
    (series,) = hh_panel.containers
    assert list(series.lines[0].get_ydata()) == [3.0, 4.0, 5.0]
    assert not hh_panel.texts
    plt.close(fig)
    without = [r for r in rows if r["judge"] != "pm_hh"]
    fig = FIGURES["fig5_revisions"](as_table(without), paper_reference())
    assert not fig.axes[5].containers
    assert any("no rows yet" in t.get_text() for t in fig.axes[5].texts)
    plt.close(fig)


def test_figure4_names_our_judge_pms_for_what_they_are():
    rows = [
        row(stage="judge", run_id="j", model="m135", parameters=135e6, eval="hhh",
            method=method, judge="pm_harmlessness", metric="accuracy", value=0.5, low=0.45,
            high=0.55, n=438)
        for method in ("pm_paper_pm", "pm_harmless-base")
    ]  # fmt: skip
    fig = FIGURES["fig4_hhh"](as_table(rows), paper_reference())
    labels = [str(c.get_label()) for c in fig.axes[0].containers]
    assert any(label.startswith("Ours: Judge PM, paper-PM labels") for label in labels)
    assert any(label.startswith("Ours: Judge PM, human harmlessness data only") for label in labels)
    assert not any("PM, human feedback" in label for label in labels)  # the paper's HH PM
    plt.close(fig)
    # the HH-RLHF baseline's training PM (human harmlessness feedback) is a series of its own
    rows.append(row(stage="pm", run_id="p", model="m135", parameters=135e6, eval="hhh",
                    method="pm_human", judge="training_pm_human", metric="accuracy", value=0.56,
                    low=0.51, high=0.61, n=438))  # fmt: skip
    fig = FIGURES["fig4_hhh"](as_table(rows), paper_reference())
    (series,) = [c for c in fig.axes[0].containers
                 if str(c.get_label()).startswith("Ours: PM, human harmlessness feedback")]  # fmt: skip
    assert list(series.lines[0].get_ydata()) == [0.56]
    plt.close(fig)


def test_tables_say_which_judge_is_at_chance(tmp_path):
    from cai.analysis.figures import validation_table

    table = as_table(flagged_rows())
    elo = elo_table(table, paper_reference())
    pm_rows = [line for line in elo.splitlines() if "| pm_harmlessness |" in line]
    assert pm_rows and all("at chance" in line for line in pm_rows)
    ai_rows = [line for line in elo.splitlines() if "| ai_feedback |" in line]
    assert ai_rows and all(line.rstrip().endswith("False |") for line in ai_rows)
    text = validation_table(table)
    assert (
        "| ai_feedback | eval | m135 | 0.510 [0.450, 0.560] | - | - | 500 | - | - | at chance |"
        in text
    )
    assert (
        "| pm_harmlessness | judge | m135 | 0.660 [0.610, 0.710] | - | - | 500 "
        "| shorter_wins: 0.640 [0.600, 0.680] | +0.020 [-0.010, +0.050] | not above shorter wins |"
    ) in text
    assert "| shorter_wins | 500 | 0.640 [0.600, 0.680] | 0.550 [0.500, 0.600] | - |" in text


def test_figure9_draws_the_reliability_of_the_hhh_answers():
    import pandas as pd

    from cai.analysis.figures import figure9

    calibration = pd.DataFrame(
        {"eval": ["hhh", "hhh"], "method": ["zero_shot"] * 2, "low": [0.5, 0.9],
         "high": [0.6, 1.0], "n": [10, 30], "confidence": [0.55, 0.95],
         "accuracy": [0.5, 0.9], "model": ["m135"] * 2}
    )  # fmt: skip
    fig = figure9(as_table([]), paper_reference(), calibration)
    ours = [line for line in fig.axes[0].lines if "zero_shot" in str(line.get_label())]
    assert ours and list(ours[0].get_ydata()) == [0.5, 0.9]
    assert list(ours[0].get_xdata()) == [0.55, 0.95]
    plt.close(fig)
