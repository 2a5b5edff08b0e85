"""Localisation by the EXACT value function V* (no learning) and by the MC / outcome labels themselves, on a
`prm_quality --rollouts teacher` output folder (docs/results.md §0c): what F1 a perfect value PRM gets.

    python -m rlloop.experiments.prm_vstar outputs/prm_quality_chain_teacher/g0.8   # writes <dir>/../vstar.json

V*(prefix k) = product over the remaining facts of (1 - teacher_error_p) for misconception facts, for a
prefix with no wrong step; 0 after a wrong step (compensating errors ignored). Task knobs: the first
chain-credit version (misconception_frac 0.2, teacher_error_p 0.6), as in §0c.
"""

import json
import statistics
import sys

from rlloop.experiments.prm_quality import best_threshold, localisation, mc_labels
from rlloop.tasks import chain

cfg = {"seed": 0, "misconception_frac": 0.2, "max_offset": 6, "teacher_error_p": 0.6}
wrong = chain.task_misconceptions(cfg)
p_err = 0.6


def vstar(r):
    p = chain.parse_question(r["question"])
    vals = p.values()
    e = r["first_error"]
    L = len(r["step_char_ends"])
    out = []
    for k in range(L):
        if e != -1 and k >= e:
            out.append(0.0)
            continue
        if k >= len(p.ops):
            out.append(1.0)
            continue
        v = 1.0
        for j in range(k + 1, len(p.ops)):
            f = (vals[j], p.ops[j][0], p.ops[j][1])
            if f in wrong:
                v *= 1 - p_err
        out.append(v)
    return out


B = sys.argv[1].rstrip("/") + "/"
ev = [json.loads(x) for x in open(B + "heldout_rollouts.jsonl")]
va = [json.loads(x) for x in open(B + "val_rollouts.jsonl")]
tr = [json.loads(x) for x in open(B + "train_rollouts.jsonl")]
fe = [r["first_error"] for r in ev]
vfe = [r["first_error"] for r in va]
V = [vstar(r) for r in ev]
VV = [vstar(r) for r in va]
res = {}
res["vstar_abs@0.5"] = localisation(V, fe)
for rule in ("abs", "drop"):
    t = best_threshold(VV, vfe, rule)
    res[f"vstar_{rule}@val"] = localisation(V, fe, t, rule)
res["vstar_drop@0.5"] = localisation(V, fe, 0.5, "drop")


# discounted (gamma=0.8 TD fixed point) value: gamma^(steps to terminal) * V*
def disc(v, g=0.8):
    L = len(v)
    return [x * g ** (L - 1 - k) for k, x in enumerate(v)]


res["vstar_g0.8_abs@0.5"] = localisation([disc(v) for v in V], fe)
res["vstar_g0.8_drop@0.5"] = localisation([disc(v) for v in V], fe, 0.5, "drop")
mco = json.load(open(B + "mc_outcomes.json"))
tfe = [r["first_error"] for r in tr]
for hard in (False, True):
    res[f"train_mc_{'hard' if hard else 'soft'}_labels_abs@0.5"] = localisation(
        [mc_labels(r, o, hard) for r, o in zip(tr, mco)], tfe
    )
    res[f"train_mc_{'hard' if hard else 'soft'}_labels_drop@0.5"] = localisation(
        [mc_labels(r, o, hard) for r, o in zip(tr, mco)], tfe, 0.5, "drop"
    )
res["train_outcome_labels_abs@0.5"] = localisation(
    [[r["correct"]] * len(r["step_char_ends"]) for r in tr], tfe
)
# mean V* on correct prefixes at step 0
res["mean_vstar_step0_of_correct_solutions"] = statistics.mean(v[0] for v, e in zip(V, fe) if e == -1)
res["share_correct_solutions_with_some_vstar_below_0.5"] = statistics.mean(
    any(x < 0.5 for x in v) for v, e in zip(V, fe) if e == -1
)
json.dump(res, open(B + "../vstar.json", "w"), indent=1)
for k, v in res.items():
    print(
        k,
        {
            a: round(b, 3)
            for a, b in v.items()
            if a in ("f1", "err_acc", "correct_acc", "early", "late", "threshold")
        }
        if isinstance(v, dict)
        else round(v, 3),
    )
