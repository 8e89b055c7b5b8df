"""Cross-validated keyed edit: keys computed once per text and layer vs once per fold.

``choose_keyed_edit`` edits the same unedited model in every fold (restoring it in
between), so the MLP keys of the retain, guard and pair texts at a candidate's first
layer are the same in every fold and for every retain weight. This times the
cross-validation of a planted-shortcut organism (GPT-2, lexical, seed 0: 4 folds by
pair, candidates layer 0, layer 1 and both, each at retain weights 0.3 and 3) with the
key cache and without it, in one run, and checks that both choose the same and measure
the same cuts.

    python benchmarks/bench_keyed_cv.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import torch

    from icp_lens.keyed_choice import KeyedCandidate, choose_keyed_edit
    from icp_lens.organisms import build_organism
    from icp_lens.pruning.source import load_checkpoint, load_tokenizer

    torch.set_num_threads(1)
    org = build_organism(variant="lexical", arch="gpt2", seed=0, progress=True)
    model, tok = load_checkpoint(org.model_dir), load_tokenizer(org.model_dir)
    pairs = [p for p in org.probes("probe") if p.spurious_counterfactual][:256]
    retain = [p.prompt for p in org.probes("train")[:256]]
    candidates = [KeyedCandidate(layers, w) for layers in ((0,), (1,), (0, 1)) for w in (0.3, 3.0)]
    times: dict[bool, list[float]] = {True: [], False: []}
    tables = {}
    for _ in range(args.repeats):
        for cache in (False, True):
            start = time.perf_counter()
            choice = choose_keyed_edit(model, tok, pairs, candidates, retain=retain, n_folds=4, by="pair",
                                       target="mean", progress=False, cache_keys=cache)  # fmt: skip
            times[cache].append(time.perf_counter() - start)
            tables[cache] = choice
    same = tables[True].chosen == tables[False].chosen
    diff = (tables[True].table["cut"] - tables[False].table["cut"]).abs().max()
    base, new = min(times[False]), min(times[True])
    print(f"cross-validation, {len(candidates)} candidates x 4 folds, 1 thread (best of {args.repeats})")
    print(f"  keys per fold (baseline): {base:.2f} s")
    print(f"  keys once per text/layer: {new:.2f} s")
    print(f"  speed-up: {base / new:.2f}x; same choice: {same}; largest cut difference {diff:.1e}")


if __name__ == "__main__":
    main()
