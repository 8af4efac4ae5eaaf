import json

import pytest
from conftest import SHARED_DATA

from l3m.errors import L3MUserError
from l3m.preference_data import (
    PreferencePair,
    detect_format,
    load_preference_pairs,
    load_preference_sources,
    parse_hh_transcript,
    prompt_to_text,
    record_to_pair,
    split_pairs,
)

PREF = SHARED_DATA / "preference"
needs_shared = pytest.mark.skipif(not PREF.is_dir(), reason=f"shared preference data not found at {PREF}")


def test_trl_formats_plain_and_conversational():
    plain = record_to_pair({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}, "x:1")
    assert plain.prompt_text == "Hi?" and plain.chosen == "Hello!" and plain.rejected == "Go away."
    conv = record_to_pair(
        {
            "prompt": [{"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
        "x:2",
    )
    assert (conv.prompt_text, conv.chosen, conv.rejected) == ("Hi?", "Hello!", "Go away.")
    implicit = record_to_pair(
        {
            "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
        },
        "x:3",
    )
    assert (implicit.prompt_text, implicit.chosen, implicit.rejected) == ("Hi?", "Hello!", "Go away.")
    assert record_to_pair({"prompt": "Hi?", "chosen": "Same", "rejected": "Same "}, "x:4") == "tie"


def test_hh_transcripts_and_multiturn_prompt_text():
    text = (
        "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: I'm locked out.\n\nAssistant: Call a locksmith."
    )
    msgs = parse_hh_transcript(text, "x")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    row = {"chosen": text, "rejected": text.replace("Call a locksmith.", "Use a bobby pin.")}
    assert detect_format(row, "x") == "hh"
    pair = record_to_pair(row, "x")
    assert pair.chosen == "Call a locksmith." and pair.rejected == "Use a bobby pin."
    assert pair.prompt_text == "Human: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: I'm locked out."
    assert prompt_to_text([{"role": "user", "content": "only one"}]) == "only one"
    with pytest.raises(L3MUserError, match="x:9.*prompt"):
        record_to_pair({"chosen": "plain text", "rejected": "other text"}, "x:9")


def test_pandalm_votes_and_autoj_labels_drop_ties():
    base = {"instruction": "Do it", "input": "", "response1": "A", "response2": "B"}
    win2 = record_to_pair({**base, "annotator1": 2, "annotator2": 1, "annotator3": 2}, "p")
    assert (win2.chosen, win2.rejected) == ("B", "A")
    assert record_to_pair({**base, "annotator1": 1, "annotator2": 0, "annotator3": 0}, "p") == "tie"
    assert record_to_pair({**base, "annotator1": 1, "annotator2": 2, "annotator3": 0}, "p") == "tie"  # a draw
    aj = {"prompt": "Q", "response 1": "R1", "response 2": "R2"}
    assert record_to_pair({**aj, "label": 0}, "a").chosen == "R1"
    assert record_to_pair({**aj, "label": 1}, "a").chosen == "R2"
    assert record_to_pair({**aj, "label": 2}, "a") == "tie"
    pku = record_to_pair({"prompt": "Q", "response": ["safe", "unsafe"]}, "k")
    assert (pku.chosen, pku.rejected) == ("safe", "unsafe")


def test_unknown_record_names_where(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"foo": 1}) + "\n")
    with pytest.raises(L3MUserError, match=r"bad.jsonl:2: not a preference record"):
        load_preference_pairs(f)


def test_split_by_prompt_keeps_groups_together():
    pairs = [PreferencePair([{"role": "user", "content": f"q{i % 7}"}], f"a{i}", f"b{i}") for i in range(70)]
    train, held = split_pairs(pairs, 0.3, seed=1)
    assert len(train) + len(held) == 70 and 14 <= len(held) <= 30
    assert not {p.prompt_text for p in train} & {p.prompt_text for p in held}
    assert split_pairs(pairs, 0.3, seed=1)[1] == held


@needs_shared
@pytest.mark.parametrize(
    "path, fmt, n_records",
    [
        ("helpful/pandalm_testset_v1.json", "pandalm", 999),
        ("helpful/autoj_testdata_pairwise.jsonl", "autoj", 1392),
        ("harmless/hh_rlhf_harmless_base_dev.jsonl.gz", "hh", 1913),
        ("harmless/pku_saferlhf_realign_5k.json", "pku", 5135),
    ],
)
def test_shared_preference_files(path, fmt, n_records):
    data = load_preference_pairs(PREF / path)
    assert data.n_records == n_records
    assert data.formats == {fmt: len(data.pairs)}
    assert len(data.pairs) + data.n_ties + data.n_unusable == n_records
    for p in data.pairs[:50]:
        assert p.prompt_text.strip() and p.chosen.strip() != p.rejected.strip()
    if fmt == "pandalm":  # 85 rows are unanimous ties, others are ties or draws by plurality
        assert data.n_ties >= 85
        first = data.pairs[0]  # idx 0: all three annotators chose response 2
        assert first.chosen == "If you have any questions, please let me know."
    elif fmt == "autoj":
        assert 373 <= data.n_ties <= 380  # 373 with label 2, and pairs whose two responses are identical
    elif fmt == "hh":
        assert data.n_ties == 0 and data.n_unusable <= 5
        assert "\n\nHuman:" not in data.pairs[0].chosen
    else:
        assert data.n_ties == 0 and len({p.prompt_text for p in data.pairs}) == 930


@needs_shared
def test_shared_files_concatenate():
    both = load_preference_sources(
        [PREF / "helpful/pandalm_testset_v1.json", PREF / "helpful/autoj_testdata_pairwise.jsonl"]
    )
    assert set(both.formats) == {"pandalm", "autoj"} and both.n_records == 999 + 1392
    assert "ties" in both.describe()
