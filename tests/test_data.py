import gzip
import json

import pytest

from l3m import L3MUserError
from l3m.data import load_examples, read_records, split_by_key, tokenize_examples


def write(path, text):
    path.write_text(text)
    return str(path)


def test_three_formats(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "q", "completion": "a"},
        {"prompt": [{"role": "user", "content": "q2"}], "completion": [{"role": "assistant", "content": "a2"}]},
        {"instruction": "Sum", "input": "1 2", "output": "3"},
        {"instruction": "Say", "output": "yes"},
    ]
    f = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    ex = load_examples(f)
    assert [e.response for e in ex] == ["hello", "a", "a2", "3", "yes"]
    assert ex[3].prompt_text == "Sum\n\n1 2"
    assert ex[0].where.endswith("d.jsonl:1")
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as g:
        g.write("\n".join(json.dumps(r) for r in rows))
    assert len(load_examples(str(gz))) == 5


def test_sharegpt_question_answer_and_plain_text_prompts(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
                {"from": "human", "value": "and?"},
                {"from": "gpt", "value": "bye"},
            ]
        },
        {"question": "What is 2+2?", "answer": "4"},
    ]
    ex = load_examples(write(tmp_path / "d.json", json.dumps(rows)))
    assert [e.response for e in ex] == ["bye", "4"]
    assert [m["role"] for m in ex[0].prompt] == ["system", "user", "assistant", "user"] and ex[0].prompt_text == "and?"
    assert ex[1].prompt == [{"role": "user", "content": "What is 2+2?"}]
    with pytest.raises(L3MUserError, match=r"s\.jsonl:1: unknown ShareGPT speaker 'bot'"):
        load_examples(write(tmp_path / "s.jsonl", json.dumps({"conversations": [{"from": "bot", "value": "x"}]})))
    # a .txt prompt set: one prompt per line, blank lines skipped; as task data it has no responses
    f = write(tmp_path / "p.txt", "Name a colour.\n\n  Write a haiku.  \n")
    ex = load_examples(f, need_response=False)
    assert [e.prompt_text for e in ex] == ["Name a colour.", "Write a haiku."] and ex[1].where.endswith("p.txt:3")
    with pytest.raises(L3MUserError, match=r"p\.txt:1: .*no reference response"):
        load_examples(f)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = write(tmp_path / "bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    with pytest.raises(L3MUserError, match=r"bad\.jsonl:2: malformed JSON"):
        load_examples(f)


def test_json_array_errors_name_the_line(tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n'
    with pytest.raises(L3MUserError, match=r"arr\.json:3: .*no reference response"):
        load_examples(write(tmp_path / "arr.json", text))
    with pytest.raises(L3MUserError, match=r"broken\.json:3: malformed JSON"):
        load_examples(write(tmp_path / "broken.json", '[\n {"a": 1},\n {"a": 2 "b": 3}\n]\n'))


def test_missing_fields_and_empty(tmp_path):
    with pytest.raises(L3MUserError, match=r"x\.jsonl:1: the record has none of the fields"):
        load_examples(write(tmp_path / "x.jsonl", '{"query": "q", "response": "a"}\n'))
    with pytest.raises(L3MUserError, match="holds no records"):
        load_examples(write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(L3MUserError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(L3MUserError, match="empty"):
        load_examples(write(tmp_path / "e.jsonl", '{"prompt": "q", "completion": "  "}\n'))


def test_prompt_only_rows_allowed_for_prompt_sets(tmp_path):
    ex = load_examples(write(tmp_path / "p.jsonl", '{"prompt": "q"}\n'), need_response=False)
    assert ex[0].response is None


def test_builtin_data_is_large_and_varied():
    train, held = load_examples("builtin"), load_examples("builtin:heldout")
    assert len(train) >= 200 and len(held) >= 40
    assert not {e.prompt_text for e in train} & {e.prompt_text for e in held}
    words = sorted(len(e.response.split()) for e in train)
    assert words[0] <= 15 and words[-1] >= 150


def test_only_response_tokens_are_masked_in(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ex = load_examples([{"prompt": "What is two plus two?", "completion": "Four."}])
    (feat,) = tokenize_examples(tok, ex)
    resp = [t for t, m in zip(feat["input_ids"], feat["response_mask"]) if m]
    assert tok.decode(resp) == "Four.<|im_end|>"
    assert feat["input_ids"][: len(feat["prompt_ids"])] == feat["prompt_ids"]
    assert tok.decode(feat["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_long_prompts_are_truncated_and_counted(tiny_model, caplog):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ex = load_examples([{"prompt": "word " * 400, "completion": "ok"}, {"prompt": "short", "completion": "ok"}])
    with caplog.at_level("WARNING"):
        feats = tokenize_examples(tok, ex, max_length=128, max_prompt_length=64)
    assert len(feats[0]["prompt_ids"]) == 64
    assert "truncated 1 prompt" in caplog.text


def test_read_records_json_array_lines(tmp_path):
    recs = read_records(write(tmp_path / "a.json", '[{"x": 1},\n\n {"x": 2}]'))
    assert [w.rsplit(":", 1)[1] for _, w in recs] == ["1", "3"]


def test_split_by_key_is_disjoint_fixed_and_keeps_a_shared_key_in_one_split():
    keys = [f"prompt {i}" for i in range(40)] + ["twice", "twice", "thrice", "thrice", "thrice"]
    sizes = {"train": 25, "selection": 10, "test": 10}
    a = split_by_key(keys, sizes, seed=0)
    assert {n: len(v) for n, v in a.items()} == sizes
    sets = [set(v) for v in a.values()]
    assert all(not (x & y) for i, x in enumerate(sets) for y in sets[i + 1 :])  # disjoint
    assert set().union(*sets) == set(range(len(keys)))  # every record in one split
    where = {i: n for n, v in a.items() for i in v}
    assert where[40] == where[41] and where[42] == where[43] == where[44]  # a repeated prompt stays in one split
    assert split_by_key(keys, sizes, seed=0) == a  # fixed for a given split seed
    assert split_by_key(keys, sizes, seed=1) != a
    with pytest.raises(ValueError, match="holds"):  # more held-out records asked for than there are
        split_by_key(keys[:10], sizes, seed=0)
