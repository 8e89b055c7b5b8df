"""``icp-lens eval``: the JSON schema users' scripts depend on."""

from __future__ import annotations

import json

from icp_lens.cli import main

KEYS = {
    "accuracy",
    "worst_group_accuracy",
    "group_accuracy",
    "flip_rate",
    "ece",
    "demographic_parity_diff",
    "equal_opportunity_gap",
}


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_eval_json_schema_with_groups_and_counterfactuals(micro_dirs, tmp_path, capsys) -> None:
    rows = [
        {"prompt": p, "answer": a, "alternatives": [b], "spurious_counterfactual": cf, "group": g}
        for p, a, b, cf, g in [
            ("a b c", " pos", " neg", "a b d", "pos|s=x"),
            ("b c d", " neg", " pos", "b c e", "neg|s=x"),
            ("c d e", " pos", " neg", "c d a", "pos|s=y"),
            ("d e a", " neg", " pos", "d e b", "neg|s=y"),
        ]
    ]
    data = write(tmp_path / "d.jsonl", rows)
    assert main(["eval", "--model", str(micro_dirs["gpt2"]), "--data", data, "--json", "--n-boot", "20"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert KEYS <= set(payload)
    assert 0 <= payload["accuracy"] <= 1 and payload["accuracy"] * 4 == round(payload["accuracy"] * 4)
    assert set(payload["group_accuracy"]) == {"pos|s=x", "neg|s=x", "pos|s=y", "neg|s=y"}
    assert payload["worst_group_accuracy"] == min(payload["group_accuracy"].values())
    assert all(payload[k] is not None for k in KEYS)


def test_eval_json_has_nulls_where_the_data_lacks_what_a_metric_needs(micro_dirs, tmp_path, capsys) -> None:
    data = write(tmp_path / "d.jsonl", [{"prompt": "a b c", "answer": " pos", "alternatives": [" neg"]}])
    assert main(["eval", "--model", str(micro_dirs["gpt2"]), "--data", data, "--json", "--n-boot", "0"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert KEYS <= set(payload)
    for key in (
        "worst_group_accuracy",
        "group_accuracy",
        "flip_rate",
        "demographic_parity_diff",
        "equal_opportunity_gap",
    ):
        assert payload[key] is None, key
    assert payload["accuracy"] in (0.0, 1.0) and payload["ece"] is not None
    assert main(["eval", "--model", str(micro_dirs["gpt2"]), "--data", data]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_eval_errors(micro_dirs, tmp_path, capsys) -> None:
    assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl")]) == 2
    assert "no config.json" in capsys.readouterr().err
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": " pos"}])
    assert main(["eval", "--model", str(micro_dirs["gpt2"]), "--data", bad]) == 2
    assert "alternatives" in capsys.readouterr().err
