"""Where a trained Q-RM puts its token rewards on held-out (chosen, rejected) pairs.

For each pair: k = the first token where the rejected completion departs from the chosen one. Prints the
rejected completions' mean s_t before and from k, how often their lowest s_t lies at or after k, and a few
pairs token by token (docs/results.md §5 quotes this output).

    python benchmarks/qrm_token_rewards.py --qrm /tmp/qrm/out/qrm --pairs /tmp/qrm/test_pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics as st

from rlloop.rewards.qrm.service import QRMScorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qrm", required=True, help="a Q-RM folder from python -m rlloop.qrm_train")
    ap.add_argument("--pairs", required=True, help="jsonl of prompt, chosen, rejected (python -m rlloop.qrm_pairs)")
    ap.add_argument("--examples", type=int, default=3)
    a = ap.parse_args()
    q = QRMScorer(a.qrm, num_threads=1)
    tok = q.tokenizer
    pre, post, min_after, n, examples = [], [], 0, 0, []
    for line in open(a.pairs):
        p = json.loads(line)
        pid = tok.encode(p["prompt"], add_special_tokens=False)
        c = tok.encode(p["chosen"], add_special_tokens=False)
        r = tok.encode(p["rejected"], add_special_tokens=False)
        k = next((i for i, (x, y) in enumerate(zip(c, r)) if x != y), min(len(c), len(r)))
        if k >= len(r):
            continue
        sc, sr = q.token_rewards([pid, pid], [c, r])
        n += 1
        if k > 0:
            pre.append(st.mean(sr[:k]))
        post.append(st.mean(sr[k:]))
        min_after += min(range(len(sr)), key=sr.__getitem__) >= k
        if len(examples) < a.examples and k > 3:
            examples.append((p, c, r, k, sc, sr))
    print(
        f"pairs {n}: rejected mean s_t before the first differing token {st.mean(pre):.3f}, from it on "
        f"{st.mean(post):.3f}; lowest s_t at/after it in {min_after}/{n} = {min_after / n:.2f}"
    )
    for p, c, r, k, sc, sr in examples:
        print("PROMPT ...", repr(p["prompt"][-80:]))
        print(" chosen  :", " ".join(f"{tok.decode([t])!r}:{s:+.2f}" for t, s in zip(c, sc)))
        print(
            " rejected:",
            " ".join(("|>" if i == k else "") + f"{tok.decode([t])!r}:{s:+.2f}" for i, (t, s) in enumerate(zip(r, sr))),
        )


if __name__ == "__main__":
    main()
