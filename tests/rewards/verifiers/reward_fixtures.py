"""User-style reward functions the tests name by dotted path (`reward_fixtures:...`), as a user would.

pytest puts this folder on sys.path; the pool hands the driver's sys.path to its workers.
"""

from __future__ import annotations

import os
import re
import signal
import time


def verl_compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl-style: 1.0 when the last integer in the text equals the ground truth, plus a dict form."""
    numbers = re.findall(r"-?\d+", solution_str)
    correct = float(bool(numbers) and numbers[-1] == str(ground_truth).strip())
    if extra_info and extra_info.get("as_dict"):
        return {"score": correct, "acc": correct, "length": float(len(solution_str)), "pred": "not a number"}
    return correct


def trl_reward(prompts, completions, ground_truth, **kwargs):
    """TRL-style: list in, list out; also checks the prompt was passed through."""
    out = []
    bonuses = kwargs.get("bonus") or [None] * len(prompts)  # a column some rows lack: None in those
    for prompt, completion, gt, bonus in zip(prompts, completions, ground_truth, bonuses, strict=True):
        out.append(
            (1.0 if completion.strip().endswith(str(gt)) else 0.0) * 0.5 + 0.5 * bool(bonus and prompt)
        )
    return out


def trl_len_reward(completions, **kwargs):
    """TRL-style without `prompts` (as in TRL's docs): shorter is better."""
    return [1.0 / (1.0 + len(c)) for c in completions]


def wrong_signature(text, answer):
    return 1.0


def sleepy(data_source, solution_str, ground_truth, extra_info=None):
    """Sleeps `extra_info['sleep']` seconds (interruptible: the soft per-sample timeout catches it)."""
    time.sleep(float(extra_info.get("sleep", 0)))
    return 1.0


def stubborn(data_source, solution_str, ground_truth, extra_info=None):
    """Ignores SIGALRM and hangs: only the pool's hard deadline (kill + replace the worker) stops it."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    time.sleep(float(extra_info.get("sleep", 60)))
    return 1.0


def crashy(data_source, solution_str, ground_truth, extra_info=None):
    """Kills its own worker process; with a marker path it crashes only the first time it runs."""
    marker = extra_info.get("marker")
    if marker is None or not os.path.exists(marker):
        if marker is not None:
            open(marker, "w").close()
        os._exit(13)
    return 1.0


def raises(data_source, solution_str, ground_truth, extra_info=None):
    raise RuntimeError("user function bug")


def misbehave(data_source, solution_str, ground_truth, extra_info=None):
    """Routes to one of the misbehaving functions above by `extra_info['mode']` (one pool, many cases)."""
    modes = {"sleepy": sleepy, "stubborn": stubborn, "crashy": crashy, "raises": raises}
    mode = (extra_info or {}).get("mode")
    if mode is None:
        return verl_compute_score(data_source, solution_str, ground_truth, extra_info)
    return modes[mode](data_source, solution_str, ground_truth, extra_info)


def openrlhf_reward(queries, prompts, labels):
    """OpenRLHF-style: 1.0 when the query (prompt + completion) ends with the label; logs the length."""
    rewards = [float(q.endswith(str(label))) for q, label in zip(queries, labels, strict=True)]
    assert all(q.startswith(p) for q, p in zip(queries, prompts, strict=True))
    return {"rewards": rewards, "scores": rewards, "extra_logs": {"query_len": [len(q) for q in queries]}}


def verl_echo_extra_info(data_source, solution_str, ground_truth, extra_info=None):
    """verl-style: the score is extra_info['weight'] when the answer is right (extra_info as given)."""
    return float(extra_info["weight"]) * float(solution_str.strip().endswith(str(ground_truth)))


async def trl_async_reward(prompts, completions, **kwargs):
    """TRL-style async: 1.0 per completion given as chat messages, 0.5 per plain string."""
    return [1.0 if isinstance(c, list) and c[0]["role"] == "assistant" else 0.5 for c in completions]


def trl_parity_reward(completions, **kwargs):
    """TRL-style, with ties: 1 for an odd-length completion, 0 for an even one (DPO's random pair rule
    then has several candidates to draw from)."""
    return [float(len(c) % 2) for c in completions]
