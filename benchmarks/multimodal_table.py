"""CIMRL and the baselines on the multimodal (Waterbirds-like) organism, 3 seeds.

For each seed, the organism (``icp-lens organism --variant waterbirds``: a tiny LLaVA
that answers with the background, not the bird) is fine-tuned from its checkpoint with
every method below: same training split (8,000 images; 3/4 carry a land/water
background agreeing with the label 95%, each with its spurious counterfactual image),
same steps, batch size, learning rate and seed (``MultimodalTrainConfig`` defaults, no
model selection: the last step is evaluated). Evaluated on ``test_balanced`` (background
independent of the label; groups label x background) and ``test_id``.

Methods (``uses``: what each needs beyond labelled images):

- ``original``, ``oracle`` (trained where the background is uninformative);
- ``erm``; ``jtt`` (the starting model's training errors upweighted x5); ``groupdro``
  (group labels);
- the CIMRL terms alone (``contrastive``: InfoNCE between an image and its background
  swap; ``disentangle``: per-modality and shared heads with the orthogonality penalty;
  ``intervention``: KL consistency under gradient-attribution counterfactuals) and
  ``cimrl`` (all three, omega = 1, 1, 1), and the ablations ``cimrl - X``.

Columns: worst-group and average accuracy on ``test_balanced``, the accuracy drop when
the background is randomised (``test_id`` accuracy minus ``test_balanced`` accuracy),
the gap closed (``(wga - original) / (oracle - original)``) and the training time
relative to ERM in the same seed's run (the ratio is the benchmark's cost figure).

    python benchmarks/multimodal_table.py [--seeds 0,1,2] [--steps 150] [--methods erm,cimrl,...]
        [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).parent / "results"
ABLATIONS = {"cimrl - contrastive": (0.0, 1.0, 1.0), "cimrl - disentangle": (1.0, 0.0, 1.0),
             "cimrl - intervention": (1.0, 1.0, 0.0)}  # fmt: skip
METHODS = ("erm", "jtt", "groupdro", "contrastive", "disentangle", "intervention", "cimrl", *ABLATIONS)
USES = {"erm": "labels", "jtt": "labels", "groupdro": "group labels", "contrastive": "image counterfactuals",
        "disentangle": "labels", "intervention": "labels", "cimrl": "image counterfactuals"}  # fmt: skip


def _scores(model, test, test_id) -> dict[str, float]:
    from icp_lens.training.multimodal import predict_classes

    ok = predict_classes(model, test) == test.labels
    groups = {int(g): ok[test.groups == g].float().mean().item() for g in test.groups.unique()}
    avg = ok.float().mean().item()
    id_acc = (predict_classes(model, test_id) == test_id.labels).float().mean().item()
    return {"worst_group_accuracy": min(groups.values()), "average_accuracy": avg,
            "id_accuracy": id_acc, "background_drop": id_acc - avg}  # fmt: skip


def run_seed(seed: int, methods: list[str], steps: int, log=print) -> list[dict]:
    from icp_lens.evaluation.metrics import gap_closed
    from icp_lens.organisms.multimodal import build_waterbirds
    from icp_lens.training.multimodal import MultimodalTrainConfig, data_from_probes, train_multimodal

    org = build_waterbirds(seed=seed, progress=True)
    processor = org.load_processor()
    train = data_from_probes(org.data_path("train"), processor)
    test = data_from_probes(org.data_path("test_balanced"), processor)
    test_id = data_from_probes(org.data_path("test_id"), processor)
    rows = []
    for name, oracle in (("original", False), ("oracle", True)):
        rows.append({"seed": seed, "method": name, "uses": "", **_scores(org.load_hf(oracle=oracle), test, test_id)})
    base, top = rows[0]["worst_group_accuracy"], rows[1]["worst_group_accuracy"]
    for method in methods:
        objective, omega = ("cimrl", ABLATIONS[method]) if method in ABLATIONS else (method, (1.0, 1.0, 1.0))
        model = org.load_hf()
        config = MultimodalTrainConfig(objective=objective, omega=omega, steps=steps, seed=seed)
        start = time.perf_counter()
        result = train_multimodal(model, train, config, progress=f"seed {seed}: {method}")
        seconds = time.perf_counter() - start
        row = {"seed": seed, "method": method, "uses": USES.get(objective, "image counterfactuals"),
               **_scores(model, test, test_id), "train_seconds": seconds,
               "final_terms": result.final_terms}  # fmt: skip
        row["gap_closed"] = gap_closed(row["worst_group_accuracy"], base, top)
        rows.append(row)
        log(f"seed {seed} {method:>22}: worst group {row['worst_group_accuracy']:.3f}, avg "
            f"{row['average_accuracy']:.3f}, {seconds:.1f} s")  # fmt: skip
    erm = next((r["train_seconds"] for r in rows if r["method"] == "erm"), None)
    for r in rows:
        if erm and "train_seconds" in r:
            r["time_vs_erm"] = r["train_seconds"] / erm
    return rows


def summarise(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    cols = ["worst_group_accuracy", "average_accuracy", "background_drop", "gap_closed", "time_vs_erm"]
    cols = [c for c in cols if c in frame]
    order = list(dict.fromkeys(frame["method"]))
    mean = frame.groupby("method", sort=False)[cols].mean().reindex(order)
    std = frame.groupby("method", sort=False)["worst_group_accuracy"].std().reindex(order)
    mean.insert(1, "worst_group_std", std)
    mean.insert(0, "uses", frame.groupby("method", sort=False)["uses"].first().reindex(order))
    return mean.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; valid: {list(METHODS)}")
    rows: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += run_seed(seed, methods, args.steps)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "multimodal_table.json").write_text(json.dumps({"steps": args.steps, "runs": rows}, indent=2))
    table = summarise(rows)
    text = [
        "# CIMRL and baselines on the multimodal organism (waterbirds x tiny LLaVA)",
        "",
        f"Seeds {args.seeds}; {args.steps} fine-tuning steps of 64 images from the organism's checkpoint; "
        "means over seeds (`worst_group_std`: standard deviation). Written by `benchmarks/multimodal_table.py`.",
        "",
        table.to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    (args.out / "multimodal_table.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
