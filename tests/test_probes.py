"""The probe JSONL format: round trips and loud, located validation errors."""

from __future__ import annotations

import json

import pytest

from icp_lens.probes import (
    FIELDS,
    IMAGE_FIELDS,
    ProbeExample,
    ProbeFormatError,
    image_file,
    probes_from_frame,
    probes_to_frame,
    read_probes,
    single_token_id,
    write_probes,
)

FULL = ProbeExample(
    prompt="from alice : the movie was great ->",
    answer=" pos",
    alternatives=(" neg",),
    spurious_counterfactual="from bob : the movie was great ->",
    causal_counterfactual="from alice : the movie was awful ->",
    causal_answer=" neg",
    group="pos|shortcut=pos",
)
MINIMAL = ProbeExample(prompt="the nurse said that", answer=" she", alternatives=(" he", " they"))
GOOD_LINE = {"prompt": "a b", "answer": " pos", "alternatives": [" neg"]}


@pytest.fixture(scope="module")
def tokenizer():
    from icp_lens.organisms.task import build_tokenizer

    return build_tokenizer()


def _write_lines(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip_jsonl(tmp_path):
    path = write_probes(tmp_path / "p.jsonl", [FULL, MINIMAL])
    assert read_probes(path) == [FULL, MINIMAL]
    lines = path.read_text().splitlines()
    assert json.loads(lines[1]) == {
        "prompt": "the nurse said that", "answer": " she", "alternatives": [" he", " they"],
    }  # fmt: skip


def test_to_dict_from_dict_round_trip():
    d = FULL.to_dict()
    assert set(d) == set(FIELDS) - set(IMAGE_FIELDS) and d["alternatives"] == [" neg"]
    assert "group" not in MINIMAL.to_dict()
    assert ProbeExample.from_dict(d) == FULL
    assert isinstance(ProbeExample.from_dict(MINIMAL.to_dict()).alternatives, tuple)


def test_frame_round_trip():
    df = probes_to_frame([FULL, MINIMAL])
    assert list(df.columns) == list(FIELDS) and len(df) == 2
    assert df.loc[0, "group"] == "pos|shortcut=pos"
    assert probes_from_frame(df) == [FULL, MINIMAL]


def test_frame_error_names_row():
    df = probes_to_frame([FULL, MINIMAL])
    df.loc[1, "answer"] = " he"
    with pytest.raises(ProbeFormatError, match=r"row 2.*among alternatives"):
        probes_from_frame(df)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"answer": " pos", "alternatives": [" neg"]}, r"missing required field.*prompt"),
        ({**GOOD_LINE, "prompt": 3}, r"'prompt' must be a string, got int"),
        ({**GOOD_LINE, "alternatives": " neg"}, r"'alternatives' must be a list of strings"),
        ({**GOOD_LINE, "alternatives": [1]}, r"'alternatives' must be a list of strings"),
        ({**GOOD_LINE, "anwser": "x"}, r"unknown field.*anwser.*valid fields.*causal_answer"),
        ({**GOOD_LINE, "causal_answer": " neg"}, r"causal_answer' is given without"),
        ({**GOOD_LINE, "alternatives": []}, r"'alternatives' is empty"),
        ({**GOOD_LINE, "alternatives": [" neg", " pos"]}, r"answer ' pos' is listed among"),
        ("{not json", r"invalid JSON"),
        ("[1, 2]", r"expected a JSON object"),
    ],
)
def test_validation_errors_name_file_and_line(tmp_path, bad, message):
    path = _write_lines(tmp_path / "bad.jsonl", [GOOD_LINE, GOOD_LINE, bad])
    with pytest.raises(ProbeFormatError, match=message) as info:
        read_probes(path)
    assert f"{path}, line 3:" in str(info.value)


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GOOD_LINE) + "\n\n" + '{"prompt": "x"}\n')
    with pytest.raises(ProbeFormatError, match="line 3: missing"):
        read_probes(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(ProbeFormatError, match="empty"):
        read_probes(path)


def test_direct_construction_validates():
    with pytest.raises(ProbeFormatError, match="empty"):
        ProbeExample(prompt="a", answer=" pos", alternatives=())
    ex = ProbeExample(prompt="a", answer=" pos", alternatives=[" neg"])  # type: ignore[arg-type]
    assert ex.alternatives == (" neg",)


def test_out_of_vocabulary_prompt_words_name_file_line_and_word(tmp_path, tokenizer):
    """Unknown words would silently become the unknown token: refused with file, line, field and word."""
    good = {**GOOD_LINE, "prompt": "the movie was great ->"}
    bad = {**FULL.to_dict(), "spurious_counterfactual": "from zorblax : the movie was great ->"}
    path = _write_lines(tmp_path / "oov.jsonl", [good, bad])
    with pytest.raises(ProbeFormatError, match=r"oov.jsonl, line 2: spurious_counterfactual has words the tokenizer "
                       r"does not know \('zorblax'\)"):  # fmt: skip
        read_probes(path, tokenizer=tokenizer)
    path = _write_lines(tmp_path / "oov2.jsonl", [{**good, "prompt": "the qwertyuiop was great ->"}])
    with pytest.raises(ProbeFormatError, match=r"line 1: prompt has words .* \('qwertyuiop'\)"):
        read_probes(path, tokenizer=tokenizer)
    assert read_probes(path)[0].prompt == "the qwertyuiop was great ->"  # without a tokenizer nothing is checked


def test_non_utf8_duplicates_and_single_example_are_reported(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(GOOD_LINE) + "\n").encode() + '{"prompt": "caf\xe9", "answer": " pos", "alternatives": [" neg"]}\n'.encode("latin-1"))
    with pytest.raises(ProbeFormatError, match=r"latin1.jsonl, line 2: not UTF-8 text"):
        read_probes(path)
    dup = _write_lines(tmp_path / "dup.jsonl", [GOOD_LINE, FULL.to_dict(), GOOD_LINE])
    with pytest.warns(UserWarning, match=r"1 duplicate line\(s\) \(line 3 repeats 1\)"):
        assert len(read_probes(dup)) == 3
    one = _write_lines(tmp_path / "one.jsonl", [GOOD_LINE])
    with pytest.warns(UserWarning, match="one example only"):
        read_probes(one)


def test_single_token_check_with_organism_tokenizer(tmp_path, tokenizer):
    ok = _write_lines(tmp_path / "ok.jsonl", [{**GOOD_LINE, "prompt": "the movie was great ->"}, FULL.to_dict()])
    assert len(read_probes(ok, tokenizer=tokenizer)) == 2
    assert single_token_id(tokenizer, " pos") == single_token_id(tokenizer, "pos")

    two = {**GOOD_LINE, "alternatives": [" neg", " very good"]}
    path = _write_lines(tmp_path / "two.jsonl", [{**GOOD_LINE, "prompt": "the movie was great ->"}, two])
    with pytest.raises(ProbeFormatError, match=r"line 2: ' very good' is not a single token") as info:
        read_probes(path, tokenizer=tokenizer)
    assert "['very', 'good']" in str(info.value)

    cf = {**FULL.to_dict(), "causal_answer": " neg neg"}
    path = _write_lines(tmp_path / "cf.jsonl", [cf])
    with pytest.raises(ProbeFormatError, match=r"line 1: ' neg neg' is not a single token"):
        read_probes(path, tokenizer=tokenizer)

    unknown = {**GOOD_LINE, "answer": " marvellous"}
    path = _write_lines(tmp_path / "unk.jsonl", [unknown])
    with pytest.raises(ProbeFormatError, match=r"line 1: ' marvellous' is not in the vocabulary"):
        read_probes(path, tokenizer=tokenizer)
    # without a tokenizer the same file is fine
    assert read_probes(path)[0].answer == " marvellous"


def _png(path, size=(8, 6), colour=(200, 30, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_probes_load_resolve_and_fail_loudly(tmp_path):
    """Image fields: paths relative to the file, checked on read; each error names its line; old files unchanged."""
    _png(tmp_path / "img" / "0.png")
    _png(tmp_path / "img" / "0_cf.png", colour=(30, 30, 200))
    _png(tmp_path / "img" / "small.png", size=(4, 4))
    (tmp_path / "img" / "junk.png").write_bytes(b"not an image at all")
    shot = {**GOOD_LINE, "image": "img/0.png", "image_counterfactual": "img/0_cf.png"}
    path = _write_lines(tmp_path / "p.jsonl", [shot, GOOD_LINE])
    examples = read_probes(path)
    assert examples[0].image == "img/0.png" and examples[1].image is None  # kept as written
    assert image_file(path, examples[0], "image_counterfactual") == tmp_path / "img" / "0_cf.png"
    assert image_file(path, examples[1]) is None
    assert write_probes(tmp_path / "again.jsonl", examples).read_text() == path.read_text()
    causal = {**shot, "image_causal_counterfactual": "img/0_cf.png", "causal_answer": " neg"}  # no text causal cf
    (row,) = read_probes(_write_lines(tmp_path / "causal.jsonl", [causal]))
    assert image_file(tmp_path / "causal.jsonl", row, "image_causal_counterfactual") == tmp_path / "img" / "0_cf.png"
    assert row.causal_answer == " neg" and row.causal_counterfactual is None
    with pytest.raises(ValueError, match=r"field must be one of \('image', 'image_counterfactual', 'image_causal"):
        image_file(path, examples[0], "picture")
    cases = [
        ({**GOOD_LINE, "image": "img/missing.png"}, r"line 2: image 'img/missing.png' not found"),
        ({**GOOD_LINE, "image": "img/junk.png"}, r"line 2: image 'img/junk.png' is not a readable image"),
        ({**GOOD_LINE, "image": "img/0.png", "image_counterfactual": "img/small.png"},
         r"line 2: image_counterfactual 'img/small.png' is 4x4, expected 8x6"),
        ({**GOOD_LINE, "image_counterfactual": "img/0.png"}, r"line 2: 'image_counterfactual' is given without"),
        ({**GOOD_LINE, "image": 3}, r"line 2: field 'image' must be a string"),
        ({**GOOD_LINE, "image_causal_counterfactual": "img/0.png", "causal_answer": " neg"},
         r"line 2: 'image_causal_counterfactual' is given without 'image'"),
        ({**GOOD_LINE, "image": "img/0.png", "image_causal_counterfactual": "img/0_cf.png"},
         r"line 2: 'image_causal_counterfactual' is given without 'causal_answer'"),
        ({**GOOD_LINE, "image": "img/0.png", "image_causal_counterfactual": "img/small.png", "causal_answer": " neg"},
         r"line 2: image_causal_counterfactual 'img/small.png' is 4x4, expected 8x6"),
    ]  # fmt: skip
    for bad, message in cases:
        with pytest.raises(ProbeFormatError, match=message):
            read_probes(_write_lines(tmp_path / "bad.jsonl", [shot, bad]))
    with pytest.raises(ProbeFormatError, match=r"line 1: image 'img/0.png' is 8x6, expected 16x16"):
        read_probes(path, image_size=(16, 16))
