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
    fig = FIGURES[name](as_table(hand_made_rows()), paper_reference())
    lines = sum(len(ax.lines) for ax in fig.axes)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert len(fig.axes) >= 1 and lines > 0
    titles = " ".join(ax.get_title() for ax in fig.axes) + " ".join(
        str(h.get_label()) for ax in fig.axes for h in ax.get_legend_handles_labels()[0]
    )
    assert "paper" in titles.lower()
    if name != "fig5_revisions":  # fig5's helpfulness panels need a helpfulness judge
        assert not any(t.startswith("no rows yet") for t in texts), texts
    plt.close(fig)


@pytest.mark.parametrize("name", list(FIGURES))
def test_each_figure_draws_the_paper_alone_from_an_empty_table(name):
    fig = FIGURES[name](as_table([]), paper_reference())
    if name in ("fig6_principles", "fig7_critique_vs_direct"):  # no digitised paper values
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
    assert len(written) == 2 * len(FIGURES) + 1
    assert not list(tmp_path.glob(".*.tmp"))
