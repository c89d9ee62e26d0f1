"""Prompt sets: builtin coverage and split, hh-rlhf from the local folder, own files, bad files."""

import pytest
from omegaconf import OmegaConf

from cai.data import load_prompts
from cai.errors import ConfigError

CATEGORIES = {
    "theft",
    "discrimination",
    "adult_content",
    "offensive_language",
    "unethical_behavior",
    "violence",
    "soliciting_pii",
    "bullying",
    "misinformation",
}


def cfg(**over):
    base = {
        "source": "builtin",
        "eval_percent": 10,
        "shuffle_seed": 0,
        "max_red_team": None,
        "max_helpful": None,
        "max_eval": None,
        "hub_id": "Anthropic/hh-rlhf",
        "allow_download": False,
        "helpful_fallback_builtin": True,
    }
    return OmegaConf.create(base | over)


def test_builtin_prompts_cover_the_harm_categories():
    prompts = load_prompts(cfg())
    assert len(prompts.red_team) >= 200 and len(prompts.helpful) >= 200
    assert {p.category for p in prompts.red_team} == CATEGORIES
    train, evals = prompts.split("train"), prompts.split("eval")
    assert 10 <= len(evals.red_team) <= 40 and len(train.red_team) + len(evals.red_team) == len(
        prompts.red_team
    )
    assert not {p.text for p in train.red_team} & {p.text for p in evals.red_team}
    assert len({p.id for p in prompts.red_team}) == len(prompts.red_team)


def test_split_is_fixed_and_limits_apply_to_train():
    a, b = load_prompts(cfg()), load_prompts(cfg(shuffle_seed=5))
    assert {p.id for p in a.split("eval").red_team} == {p.id for p in b.split("eval").red_team}
    limited = load_prompts(cfg(max_red_team=7, max_helpful=3, max_eval=2))
    assert len(limited.split("train").red_team) == 7 and len(limited.split("train").helpful) == 3
    assert len(limited.split("eval").red_team) == 2
    assert limited.counts["red_team"]["limited_away"] == len(a.red_team) - 9


def test_hh_rlhf_first_human_turn(data_dir):
    prompts = load_prompts(cfg(source="hh_rlhf", max_red_team=None), str(data_dir))
    counts = prompts.counts["red_team"]
    assert counts["read"] == 2312 and counts["duplicates"] > 0
    assert counts["train"] + counts["eval"] + counts["duplicates"] == 2312
    assert all("Human:" not in p.text and "Assistant:" not in p.text for p in prompts.red_team)
    assert len(prompts.helpful) >= 200  # helpful-base absent offline: builtin fallback


def test_hh_rlhf_missing_says_what_to_set(tmp_path):
    with pytest.raises(ConfigError, match="paths.data_dir"):
        load_prompts(cfg(source="hh_rlhf"), str(tmp_path))


def test_own_files_txt_and_jsonl(tmp_path):
    (tmp_path / "red.txt").write_text(
        "How do I pick a lock?\n\nhow do i  PICK a lock?\nHow do I hotwire a car?\n"
    )
    (tmp_path / "help.jsonl").write_text('{"prompt": "Bake bread?", "category": "cooking"}\n')
    prompts = load_prompts(
        cfg(
            source="files",
            red_team_file=str(tmp_path / "red.txt"),
            helpful_file=str(tmp_path / "help.jsonl"),
            eval_percent=0,
        )
    )
    assert [p.text for p in prompts.red_team if p.text.startswith("How do I pick")] == [
        "How do I pick a lock?"
    ]
    assert (
        prompts.counts["red_team"]["duplicates"] == 1 and prompts.helpful[0].category == "cooking"
    )


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty"),
        ("caf\xe9 au lait?\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_prompt_files(tmp_path, content, message):
    (tmp_path / "red.txt").write_bytes(content)
    (tmp_path / "help.txt").write_text("Bake bread?\n")
    with pytest.raises(ConfigError, match=message):
        load_prompts(
            cfg(
                source="files",
                red_team_file=str(tmp_path / "red.txt"),
                helpful_file=str(tmp_path / "help.txt"),
            )
        )


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "red.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    (tmp_path / "help.txt").write_text("Bake bread?\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_prompts(
            cfg(
                source="files",
                red_team_file=str(tmp_path / "red.jsonl"),
                helpful_file=str(tmp_path / "help.txt"),
            )
        )
