"""Did RL fix each wrong fact, or learn one shared direction? Per-fact accuracy on the chain task.

For every fact a op b of the chain task, `--contexts` random chains that reach it with a correct prefix
are scored by teacher forcing: the probability of the right result's digits after `a op b =`, and whether
greedy decoding writes the right result. Facts fall into three groups:

- `normal`: the teacher never got them wrong;
- `wrong_seen`: misconception facts that RL training prompts use;
- `wrong_heldout`: misconception facts that no RL prompt uses (`task.heldout_fact_frac`).

If RL learned the facts it practised, `wrong_seen` rises and `wrong_heldout` stays near where pretraining
left it; one shared "distrust your first guess" direction would move both.

    python -m rlloop.experiments.chain_facts --model <pretrained folder> --model <rl checkpoint> ...
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

import torch

from rlloop.tasks import chain


def _task_cfg(overrides: list[str]) -> Any:
    from omegaconf import OmegaConf

    from rlloop.config import TaskConfig
    from rlloop.experiments.common import REPO

    cfg = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(REPO / "conf" / "task" / "chain.yaml"))
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def contexts_for(fact: chain.Fact, n: int, rng: random.Random) -> list[chain.ChainProblem]:
    """`n` chains whose step k applies `fact` after a correct prefix (k random in 0..3, the chain padded to
    3-6 steps with random in-range operations)."""
    a, op, b = fact
    out = []
    for _ in range(n * 50):
        if len(out) == n:
            break
        k = rng.randint(0, 3)
        # walk backwards from a: k random operations whose inverse stays in range
        vals, ops = [a], []
        for _ in range(k):
            prev_op, prev_b = rng.choice("+-"), rng.randint(1, chain.MAX_OPERAND)
            before = vals[0] - prev_b if prev_op == "+" else vals[0] + prev_b
            if not 0 <= before <= chain.MAX_VALUE:
                break
            vals.insert(0, before)
            ops.insert(0, (prev_op, prev_b))
        if len(ops) != k or not 1 <= vals[0] <= chain.MAX_OPERAND:
            continue
        ops.append((op, b))
        v = chain.apply(a, op, b)
        while len(ops) < max(3, k + 2):
            choices = [(o, x) for o in "+-" for x in range(1, 10) if 0 <= chain.apply(v, o, x) <= chain.MAX_VALUE]
            o, x = rng.choice(choices)
            ops.append((o, x))
            v = chain.apply(v, o, x)
        out.append((chain.ChainProblem(start=vals[0], ops=tuple(ops)), k))
    return out


@torch.no_grad()
def fact_scores(model_path: str, task_cfg: Any, contexts: int = 4, seed: int = 0) -> dict[str, dict[str, float]]:
    """{group: {right_prob, greedy_right, facts}} for one model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlloop.data.loader import render_prompt
    from rlloop.types import Sample

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    wrong = chain.task_misconceptions(task_cfg)
    held = chain.heldout_facts(task_cfg)
    rng = random.Random(seed)
    per_group: dict[str, list[tuple[float, float]]] = {"normal": [], "wrong_seen": [], "wrong_heldout": []}
    for fact in chain.FACTS:
        group = "normal" if fact not in wrong else ("wrong_heldout" if fact in held else "wrong_seen")
        probs, greedy = [], []
        for p, k in contexts_for(fact, contexts, rng):
            vals = p.values()
            prefix = "".join(f"{vals[j]}{o}{x}={vals[j + 1]}{chain.STEP_DELIMITER}" for j, (o, x) in enumerate(p.ops[:k]))
            prefix += f"{vals[k]}{p.ops[k][0]}{p.ops[k][1]}="
            prompt = render_prompt(Sample(uid="f", prompt=p.question, data_source="chain", ground_truth=""), tok, task_cfg)
            ids = prompt + tok(prefix, add_special_tokens=False).input_ids
            right = str(vals[k + 1])
            target = tok(right, add_special_tokens=False).input_ids
            logits = model(torch.tensor([ids + target])).logits[0]
            logp = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(target)], -1)
            probs.append(float(logp.gather(1, torch.tensor(target)[:, None]).sum().exp()))
            out = model.generate(torch.tensor([ids]), max_new_tokens=len(target) + 1, do_sample=False,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
            text = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
            digits = "".join(ch for ch in text.split("\n")[0] if ch.isdigit() or ch == "-")
            greedy.append(float(digits == right))
        if probs:
            per_group[group].append((sum(probs) / len(probs), sum(greedy) / len(greedy)))
    return {
        g: {
            "right_prob": sum(p for p, _ in rows) / max(1, len(rows)),
            "greedy_right": sum(r for _, r in rows) / max(1, len(rows)),
            "facts": float(len(rows)),
        }
        for g, rows in per_group.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="model folder (repeatable)")
    ap.add_argument("--contexts", type=int, default=4, help="chains per fact")
    ap.add_argument("--task", action="append", default=[], help="task.* override, e.g. heldout_fact_frac=0.1")
    args = ap.parse_args()
    cfg = _task_cfg(args.task)
    for path in args.model:
        scores = fact_scores(path, cfg, contexts=args.contexts)
        print(json.dumps({"model": path, **scores}))
        line = " ".join(
            f"{g}: p={s['right_prob']:.3f} greedy={s['greedy_right']:.3f} (n={int(s['facts'])})" for g, s in scores.items()
        )
        print(f"chain_facts: {path}: {line}")


if __name__ == "__main__":
    main()
