"""A wide pool of profession-swap pairs: many professions, so invariance has to generalise.

The train split of :mod:`examples.smollm2_case.pronouns` has six (female, male) profession pairs.
Consistency fine-tuning on their swaps makes the model ignore *those* professions
(flip rate 0 on them) but barely moves unseen ones (held-out flip rate 0.66 against
ERM's 0.74): with a dozen words, the cheapest way to satisfy the loss is to unlearn
each word's gender, not the rule that a profession says nothing about the person.

:func:`wide_pair_pool` swaps every profession of a larger list (the train split's
plus :data:`EXTRA_FEMALE` / :data:`EXTRA_MALE`) with every profession of the other list
that has the same number of tokens, over the train templates plus
:data:`EXTRA_TEMPLATES`. None of these words or templates belongs to the eval split
(:func:`eval_overlap` checks it; the tests assert it is empty), so held-out
professions stay held out. Whether the extra professions really lean female or male
for the model does not matter: the pair terms are symmetric in ``x`` and ``x_cf``.

How it was chosen: on a validation split carved from the *train* professions
(secretary/engineer and housekeeper/janitor held out of the pool, 20 prompts; seed 0,
30 LoRA steps; validation stereotype gap of the original 2.36, flip rate 1.0). ERM:
flip 0.60, gap 10.3. Consistency on the train-split pool: flip 0.50; on a pool of the
same 8 professions with extra templates, cross and neutral swaps: 0.50-0.60 (CLP on it
0.40). Consistency on the wide pool (lam 0.5, retain term): flip 0.10, gap 1.06, but
every profession drifted toward " he" (female-side margin +1.24 -> -0.73). Adding the
neutral swaps: gap 0.84; plus the neutral anchor prompts in the retain pool: gap 0.89;
lam 0.3: gap 0.57; **lam 0.15: flip 0.00, gap 0.16 (93% cut), margins -0.28 / -0.44,
explicit cues 100%, perplexity 53.3 vs the original's 53.8** (other reviews); a
retain weight of 4 instead of 1: gap 0.90. ``consistency_wide`` in
:mod:`examples.smollm2_case.finetune` is that last setting. The eval split was not read
for any of these runs. On the eval split (seeds 0, 1) it gives held-out flip rate 0.29
(ERM 0.74) and a held-out gap cut of 83% (CLP 72%), perplexity -0.8%
(``benchmarks/results/smollm2_finetune.md``).

The seen professions, on the same validation split (the 40 prompts of the other
train-split professions): ``consistency_wide`` leaves their margins near 0 with small
residual differences (|delta margin| 0.47), so 0.25 of them still flip. More pair
weight (lam 0.05) or more copies of the seen pairs in the pool (30x, 90x) brings the
answers even closer to 50/50 and the flips stay (0.10-0.40; lam 0.05 also drops
explicit-cue accuracy to 0.73); 60 steps: seen flips 0.05 but validation gap 0.49;
30x copies and 60 steps: flips 0.00 / 0.00, gap 0.46. Plain consistency on the seen
pairs alone: seen flips 0.05, validation flips 0.50. **Two stages** (the wide pool for
30 steps, then 15 steps with the same loss and retain term on the seen pairs alone):
seen flips 0.00, validation flips 0.00, validation gap 0.19 (92% cut), perplexity 53.4;
seed 1 the same (0.00 / 0.00, gap 0.20); a 10-step second stage: 0.00 / 0.00, gap 0.11;
the second stage without the retain term at lam 0.5: 0.00 / 0.10, gap 0.83. A longer
second stage fits the seen professions alone: 30 steps, validation flips 0.10 and gap
0.44 / 0.53 (seeds 0 / 1). So the second stage stops early on the seen pairs' own flip
rate (checked every 5 steps, at most 30, stopped 2 checks after the last drop, earliest
best weights kept): it stopped at 5 steps on both seeds, seen flips 0.00, validation
flips 0.00, validation gap 0.08 / 0.15 (fixed 15 steps: 0.19 / 0.20; checks every 3
steps: 0.09 / 0.21). That rule is ``consistency_staged``. (History: a first eval run
with a fixed 15-step second stage left 2 of the 60 seen prompts flipping on seed 1,
seen flip rate 0.017 over both seeds, held-out 0.27, gap cut 81%; the stopping rule was
then chosen on this validation split and the eval run repeated once.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from icp_lens.probes import ProbeExample

__all__ = [
    "ANCHOR_WORDS",
    "EXTRA_FEMALE",
    "EXTRA_MALE",
    "EXTRA_TEMPLATES",
    "NEUTRAL_WORDS",
    "anchor_prompts",
    "eval_overlap",
    "wide_pair_pool",
]

#: extra professions on the female side of the swaps (none is an eval-split word)
EXTRA_FEMALE: tuple[str, ...] = (
    "cashier", "cleaner", "florist", "babysitter", "beautician", "typist", "counselor", "dietitian",
    "assistant", "clerk", "bookkeeper", "designer", "editor", "nutritionist", "therapist",
)  # fmt: skip
#: extra professions on the male side of the swaps (none is an eval-split word)
EXTRA_MALE: tuple[str, ...] = (
    "mover", "farmer", "guard", "pilot", "surgeon", "miner", "welder", "mason", "builder", "driver",
    "chef", "banker", "lawyer", "programmer", "architect", "laborer", "captain", "boxer", "technician",
)  # fmt: skip
#: extra templates (none is an eval-split template or uses an eval-split verb)
EXTRA_TEMPLATES: tuple[str, ...] = (
    "At the party the {x} joked that",
    "On the phone the {x} insisted that",
    "Before the meeting the {x} warned that",
    "In the email the {x} noted that",
    "At the station the {x} reported that",
    "Over coffee the {x} suggested that",
)


#: a neutral person noun per token count (SmolLM2, leading space), for the swaps profession -> neutral
NEUTRAL_WORDS: dict[int, str] = {1: "person", 2: "staffer"}
#: neutral nouns whose prompts anchor the answer distribution to the original model's (see ``anchor_prompts``)
ANCHOR_WORDS: tuple[str, ...] = ("person", "worker", "employee", "individual")


def _verb(template: str) -> str:
    return template.split("{x}")[1].split()[0]  # "... the {x} wrote that" -> "wrote"


def eval_overlap() -> set[str]:
    """Professions, templates and template verbs of the wide pool that the eval split also uses: must be empty."""
    from examples.smollm2_case.pronouns import PRONOUN_SPLITS

    ev, train = PRONOUN_SPLITS["eval"], PRONOUN_SPLITS["train"]
    templates = train.templates + EXTRA_TEMPLATES
    ours = set(EXTRA_FEMALE) | set(EXTRA_MALE) | {w for f, m, _ in train.pairs for w in (f, m)}
    ours |= set(NEUTRAL_WORDS.values()) | set(ANCHOR_WORDS) | set(templates) | {_verb(t) for t in templates}
    return ours & ({w for f, m, _ in ev.pairs for w in (f, m)} | set(ev.templates) | {_verb(t) for t in ev.templates})


def wide_pair_pool(tokenizer: Any, *, exclude: Sequence[str] = (), neutral: bool = False) -> list[ProbeExample]:
    """Profession-swap pairs over the train split's professions and the extra ones.

    Every female-side profession is swapped with every male-side one of the same token
    count (``tokenizer``, leading space), in both directions, over the train templates and
    :data:`EXTRA_TEMPLATES`; ``exclude`` drops professions (e.g. a validation split's).
    ``neutral`` appends, per template, each profession swapped for the
    :data:`NEUTRAL_WORDS` noun of its token count ("the nurse" vs "the person"): the
    pair terms then pull every profession toward one neutral reference instead of only
    toward each other. Each example has ``answer`` " she", ``alternatives`` (" he",),
    the swap as ``spurious_counterfactual`` and the profession's side as ``group``.
    """
    from examples.smollm2_case.pronouns import FEMALE, HE, MALE, PRONOUN_SPLITS, SHE

    train = PRONOUN_SPLITS["train"]
    drop = set(exclude)
    female = [w for w in [f for f, _, _ in train.pairs] + list(EXTRA_FEMALE) if w not in drop]
    male = [w for w in [m for _, m, _ in train.pairs] + list(EXTRA_MALE) if w not in drop]
    counts = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in female + male}
    out: list[ProbeExample] = []
    for template in train.templates + EXTRA_TEMPLATES:
        for f in female:
            for m in male:
                if counts[f] != counts[m]:
                    continue
                for job, other, group in ((f, m, FEMALE), (m, f, MALE)):
                    out.append(ProbeExample(prompt=template.format(x=job), answer=SHE, alternatives=(HE,),
                                            spurious_counterfactual=template.format(x=other), group=group))  # fmt: skip
    if neutral:
        sides = [(w, FEMALE) for w in female] + [(w, MALE) for w in male]
        for template in train.templates + EXTRA_TEMPLATES:
            for job, group in sides:
                word = NEUTRAL_WORDS.get(counts[job])
                if word is None or len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) != counts[job]:
                    continue
                out.append(ProbeExample(prompt=template.format(x=job), answer=SHE, alternatives=(HE,),
                                        spurious_counterfactual=template.format(x=word), group=group))  # fmt: skip
    return out


def anchor_prompts() -> list[str]:
    """The train and extra templates with each :data:`ANCHOR_WORDS` noun ("Yesterday the person wrote that").

    Added to the retain pool, they hold the answer distribution after a *neutral* noun at
    the original model's: the pair terms make every profession answer like its swap, and
    without an anchor that shared answer drifts toward " he" (the task term pushes the
    male-ish words harder than the female-ish ones).
    """
    from examples.smollm2_case.pronouns import PRONOUN_SPLITS

    return [t.format(x=w) for t in PRONOUN_SPLITS["train"].templates + EXTRA_TEMPLATES for w in ANCHOR_WORDS]
