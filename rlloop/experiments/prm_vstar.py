"""What a PERFECT value PRM would localise on a `prm_quality --rollouts teacher` folder (docs/results.md §0c):
the exact value function V* of the chain task's misconception teacher, with no learning.

    python -m rlloop.experiments.prm_vstar outputs/prm_credit4     # prints a table, writes <dir>/vstar.json

V*(prefix) = P(the teacher, carrying on from the value the prefix last wrote, ends on the right answer),
computed exactly by propagating the distribution of the running value through the remaining operations
(a misconception fact gives its wrong result with probability `teacher_error_p`). Compensating errors
count: from a wrong value the chain can still end right, which is why an outcome-derived value cannot
localise every first error. V*(prompt) is the same from the start. The task config (knobs, misconceptions)
is the one the folder's `prm_quality.json` was run with.

Reported on the held-out rows, thresholds chosen on the validation rows as `prm_quality` does: V* at
V < 0.5, at τ from validation, the drop rule from V_{-1} = 1 and from V_{-1} = V*(prompt); "reachable"
(V* > 0, what hard MC labels tend to with unlimited samples); and at each exact first error, the share of
solutions from which the right answer stays reachable and the share whose V* does not fall at all.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlloop.experiments.prm_quality import best_threshold, localisation
from rlloop.tasks import chain


def success_probability(
    value: int, ops: Sequence[tuple[str, int]], answer: int, wrong: dict, error_p: float
) -> float:
    """P(the teacher ends on `answer`) from running value `value` through `ops` (exact)."""
    dist: dict[int, float] = {value: 1.0}
    for op, b in ops:
        nxt: dict[int, float] = defaultdict(float)
        for a, p in dist.items():
            right = chain.apply(a, op, b)
            if (a, op, b) in wrong:
                nxt[wrong[(a, op, b)]] += p * error_p
                nxt[right] += p * (1.0 - error_p)
            else:
                nxt[right] += p
        dist = nxt
    return dist.get(answer, 0.0)


def exact_values(row: dict, wrong: dict, error_p: float) -> tuple[float, list[float]]:
    """(V*(prompt), [V*(prefix ending at step k)] for every step of a teacher row); the boxed step (and
    any step past the operations) gets the row's outcome."""
    p = chain.parse_question(row["question"])
    values = []
    for k in range(len(row["step_char_ends"])):
        if k < len(row["written"]) and k < len(p.ops):
            values.append(success_probability(row["written"][k], p.ops[k + 1 :], p.answer, wrong, error_p))
        else:
            values.append(float(row["correct"]))
    return success_probability(p.start, p.ops, p.answer, wrong, error_p), values


def _task_config(folder: Path) -> Any:
    from rlloop.train import compose_config

    settings = json.loads((folder / "prm_quality.json").read_text())["settings"]
    if settings.get("rollouts") != "teacher":
        raise ValueError(f"{folder}: V* is the teacher's; run prm_quality with --rollouts teacher")
    return compose_config([f"task={settings['task']}", *settings.get("task_overrides", [])]).task


def _brief(loc: dict) -> dict:
    return {k: round(loc[k], 3) for k in ("f1", "err_acc", "correct_acc", "early", "late", "threshold")}


def report(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    task_cfg = _task_config(folder)
    wrong = chain.task_misconceptions(task_cfg)
    error_p = chain.knobs(task_cfg)["teacher_error_p"]

    def load(name: str) -> list[dict]:
        return [json.loads(x) for x in (folder / name).read_text().splitlines() if x.strip()]

    ev, va = load("heldout_rollouts.jsonl"), load("val_rollouts.jsonl")
    E = [exact_values(r, wrong, error_p) for r in ev]
    V = [exact_values(r, wrong, error_p) for r in va]
    fe, vfe = [r["first_error"] for r in ev], [r["first_error"] for r in va]
    ev_v, va_v = [x[1] for x in E], [x[1] for x in V]
    ev_p, va_p = [x[0] for x in E], [x[0] for x in V]
    out: dict[str, Any] = {"abs@0.5": localisation(ev_v, fe)}
    for rule in ("abs", "drop"):
        out[f"{rule}@val"] = localisation(ev_v, fe, best_threshold(va_v, vfe, rule), rule)
    out["dropp@val"] = localisation(ev_v, fe, best_threshold(va_v, vfe, "drop", va_p), "drop", ev_p)
    out["reachable"] = localisation([[float(x > 0) for x in v] for v in ev_v], fe)
    # at the exact first error: does V* fall, and can the chain still end right?
    ratios = []
    for (v0, vs), e in zip(E, fe, strict=True):
        if 0 <= e < len(vs):
            prev = v0 if e == 0 else vs[e - 1]
            ratios.append(vs[e] / prev if prev > 0 else 0.0)
    out["at_first_error"] = {
        "n": len(ratios),
        "share_still_reachable": sum(r > 0 for r in ratios) / len(ratios),
        "share_not_falling": sum(r >= 1 for r in ratios) / len(ratios),
        "median_ratio": statistics.median(ratios),
    }
    out["mean_vstar_prompt"] = statistics.mean(ev_p)
    out["task"] = {"misconceptions": len(wrong), "teacher_error_p": error_p, **chain.knobs(task_cfg)}
    (folder / "vstar.json").write_text(json.dumps(out, indent=2))
    return out


def markdown(res: dict) -> str:
    names = {
        "abs@0.5": "V* < 0.5",
        "abs@val": "V* < τ, τ from val",
        "drop@val": "drop rule from V_{-1} = 1, τ from val",
        "dropp@val": "drop rule from V_{-1} = V*(prompt), τ from val",
        "reachable": "reachable (V* > 0): hard MC labels with unlimited samples",
    }
    lines = ["| exact value, rule | F1 | err acc | correct acc | early | late | τ |", "|---|---|---|---|---|---|---|"]
    for key, name in names.items():
        b = _brief(res[key])
        lines.append(
            f"| {name} | {b['f1']:.3f} | {b['err_acc']:.3f} | {b['correct_acc']:.3f} | {b['early']:.3f} "
            f"| {b['late']:.3f} | {b['threshold']:.2f} |"
        )
    a = res["at_first_error"]
    lines.append(
        f"\nAt the exact first error ({a['n']} held-out solutions): the right answer stays reachable in "
        f"{a['share_still_reachable']:.3f}, V* does not fall in {a['share_not_falling']:.3f}; median "
        f"V*(after) / V*(before) {a['median_ratio']:.3f}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="a prm_quality output folder made with --rollouts teacher")
    print(markdown(report(ap.parse_args(argv).folder)))


if __name__ == "__main__":
    main()
