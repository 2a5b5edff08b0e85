"""Slow, obviously-correct references for rlloop.algos: plain Python loops over lists of floats.

Each mirrors the formula in the docstring of the function it checks, written the long way round.
"""

from __future__ import annotations

import math
from collections import defaultdict


def rows(mask):
    """Response token indices of each row (mask 1), in order."""
    return [[t for t, m in enumerate(r) if m] for r in mask]


def mean_std(xs):
    """Mean and unbiased std; fewer than two values or all tied -> std 1 (mean of none is 0)."""
    n = len(xs)
    mu = sum(xs) / n if n else 0.0
    if n < 2 or len(set(xs)) == 1:
        return (xs[0] if n else 0.0), 1.0
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1))


def groups_of(gids):
    g = defaultdict(list)
    for i, k in enumerate(gids):
        g[k].append(i)
    return g


def live_groups(gids, mask):
    """Groups of row indices, leaving out rows with no response token (padding, not samples)."""
    g = defaultdict(list)
    for i, k in enumerate(gids):
        if any(mask[i]):
            g[k].append(i)
    return g


def scores(rewards, mask):
    return [sum(rewards[b][t] for t in ts) for b, ts in enumerate(rows(mask))]


def broadcast(per_row, mask):
    return [[per_row[b] if m else 0.0 for m in r] for b, r in enumerate(mask)]


def whiten_tokens(mat, mask, eps):
    vals = [mat[b][t] for b, ts in enumerate(rows(mask)) for t in ts]
    mu, sd = mean_std(vals)
    return [
        [(mat[b][t] - mu) / (sd + eps) if mask[b][t] else 0.0 for t in range(len(mask[b]))]
        for b in range(len(mask))
    ]


# ----------------------------------------------------------------- advantages
def grpo(rewards, mask, gids, eps):
    s = scores(rewards, mask)
    adv = [0.0] * len(s)
    for members in live_groups(gids, mask).values():
        if len(members) == 1:
            continue
        mu, sd = mean_std([s[i] for i in members])
        for i in members:
            adv[i] = (s[i] - mu) / (sd + eps)
    return broadcast(adv, mask)


def dr_grpo(rewards, mask, gids):
    s = scores(rewards, mask)
    adv = [0.0] * len(s)
    for members in live_groups(gids, mask).values():
        mu = sum(s[i] for i in members) / len(members)
        for i in members:
            adv[i] = s[i] - mu
    return broadcast(adv, mask)


def rloo(rewards, mask, gids):
    s = scores(rewards, mask)
    adv = [0.0] * len(s)
    for members in live_groups(gids, mask).values():
        if len(members) == 1:
            continue
        for i in members:
            others = [s[j] for j in members if j != i]
            adv[i] = s[i] - sum(others) / len(others)
    return broadcast(adv, mask)


def token_returns(rewards, mask, gamma):
    out = [[0.0] * len(r) for r in mask]
    for b, ts in enumerate(rows(mask)):
        g = 0.0
        for t in reversed(ts):
            g = rewards[b][t] + gamma * g
            out[b][t] = g
    return out


def reinforce_pp(rewards, mask, gids, gamma, eps):
    ret = token_returns(rewards, mask, gamma)
    return whiten_tokens(ret, mask, eps), ret


def reinforce_pp_baseline(rewards, mask, gids, eps):
    adv = dr_grpo(rewards, mask, gids)
    return whiten_tokens(adv, mask, eps)


def gdpo(components, weights, mask, gids, eps):
    B, S = len(components), len(components[0])
    summed = [0.0] * B
    for i in range(S):
        for members in live_groups(gids, mask).values():
            if len(members) == 1:
                continue
            mu, sd = mean_std([components[b][i] for b in members])
            for b in members:
                summed[b] += weights[i] * (components[b][i] - mu) / (sd + eps)
    live = [b for b in range(B) if any(mask[b])]
    mu, sd = mean_std([summed[b] for b in live])
    return broadcast([(x - mu) / (sd + eps) for x in summed], mask)


def gae(rewards, values, mask, gamma, lam, eps, whiten):
    adv = [[0.0] * len(r) for r in mask]
    ret = [[0.0] * len(r) for r in mask]
    for b, ts in enumerate(rows(mask)):
        a_next, v_next = 0.0, 0.0
        for t in reversed(ts):
            delta = rewards[b][t] + gamma * v_next - values[b][t]
            a_next = delta + gamma * lam * a_next
            v_next = values[b][t]
            adv[b][t] = a_next
            ret[b][t] = a_next + values[b][t]
    return (whiten_tokens(adv, mask, eps) if whiten else adv), ret


# ---------------------------------------------------------------------- losses
def aggregate(loss, mask, mode, norm_len=None):
    rs = rows(mask)
    live = [b for b, ts in enumerate(rs) if ts]
    if mode == "token-mean":
        n = sum(len(ts) for ts in rs)
        return sum(loss[b][t] for b, ts in enumerate(rs) for t in ts) / n if n else 0.0
    if mode == "seq-mean-token-sum":
        return sum(sum(loss[b][t] for t in rs[b]) for b in live) / len(live) if live else 0.0
    if mode == "seq-mean-token-mean":
        return sum(sum(loss[b][t] for t in rs[b]) / len(rs[b]) for b in live) / len(live) if live else 0.0
    length = norm_len or len(mask[0])
    return sum(loss[b][t] for b, ts in enumerate(rs) for t in ts) / (len(mask) * length)


def clip(x, lo, hi):
    return min(max(x, lo), hi)


def ppo_token(lp, old, a, lo, hi):
    r = math.exp(clip(lp - old, -20, 20))
    return max(-a * r, -a * clip(r, 1 - lo, 1 + hi))


def policy_loss_matrix(name, lp, old, adv, mask, lo, hi, c):
    B, T = len(lp), len(lp[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        if name == "gspo":
            ts = [t for t in range(T) if mask[b][t]]
            seq = sum(lp[b][t] - old[b][t] for t in ts) / max(len(ts), 1)
            s = math.exp(min(seq, 10.0))
        for t in range(T):
            a = adv[b][t]
            if name == "gspo":
                out[b][t] = max(-a * s, -a * clip(s, 1 - lo, 1 + hi))
                continue
            loss = ppo_token(lp[b][t], old[b][t], a, lo, hi)
            if name == "dual_clip" and a < 0:
                loss = min(loss, -a * c)
            out[b][t] = loss
    return out


def kl(name, lp, ref):
    x = lp - ref
    if name == "k1":
        return x
    if name == "k2":
        return 0.5 * x * x
    if name == "abs":
        return abs(x)
    y = clip(-x, -20, 20)
    return clip(math.exp(y) - y - 1, -10, 10)


def entropy(logits_row):
    m = max(logits_row)
    z = sum(math.exp(v - m) for v in logits_row)
    ps = [math.exp(v - m) / z for v in logits_row]
    return -sum(p * math.log(p) for p in ps if p > 0)


# ---------------------------------------------------------------------- fusion
def logit(v, c=1e-6):
    v = clip(v, c, 1 - c)
    return math.log(v / (1 - v))


def step_fusion(
    outcome,
    step_values,
    step_pos,
    step_mask,
    mask,
    gids,
    w_rule,
    w_prm,
    gamma,
    process,
    norm,
    prompt_value,
    eps,
    whiten,
):
    B, T = len(mask), len(mask[0])
    rs = rows(mask)
    events = []  # per row: list of (position, raw process reward)
    for b in range(B):
        ts = rs[b]
        steps = [(step_pos[b][k], step_values[b][k]) for k in range(len(step_mask[b])) if step_mask[b][k]]
        ev = []
        if process == "value":
            ev = list(steps)
        elif ts:
            phi = [prompt_value[b] if prompt_value is not None else 0.0] + [v for _, v in steps]
            last = ts[-1]
            ends_on_step = bool(steps) and steps[-1][0] == last
            if ends_on_step:
                phi[-1] = 0.0  # terminal potential
            for k, (p, _) in enumerate(steps):
                ev.append((p, gamma * phi[k + 1] - phi[k]))
            if not ends_on_step:
                ev.append((last, -phi[-1]))  # transition to the terminal state
        events.append(ev)

    def normalise(values_by_row, center):
        # values_by_row: list (per row) of lists of floats -> same shape, normalised
        if norm == "none":
            return values_by_row
        if norm == "batch":
            pools = {None: [v for r in values_by_row for v in r]}
            key = lambda b: None  # noqa: E731
        else:
            pools = defaultdict(list)
            for b, r in enumerate(values_by_row):
                pools[gids[b]].extend(r)
            key = lambda b: gids[b]  # noqa: E731
        stats = {k: mean_std(v) for k, v in pools.items()}
        out = []
        for b, r in enumerate(values_by_row):
            mu, sd = stats[key(b)]
            out.append([((v - mu) if center else v) / (sd + eps) for v in r])
        return out

    proc = normalise([[v for _, v in ev] for ev in events], center=(process == "value"))
    outc = normalise([[outcome[b]] if rs[b] else [] for b in range(B)], center=True)
    step_end = [set(step_pos[b][k] for k in range(len(step_mask[b])) if step_mask[b][k]) for b in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        if not rs[b]:
            continue
        r_tok = defaultdict(float)
        for (p, _), v in zip(events[b], proc[b], strict=True):
            r_tok[p] += w_prm * v
        r_tok[rs[b][-1]] += w_rule * outc[b][0]
        g = 0.0
        for t in reversed(rs[b]):
            g = r_tok[t] + (gamma if t in step_end[b] else 1.0) * g
            ret[b][t] = g
    adv = whiten_tokens(ret, mask, eps) if whiten else ret
    return adv, ret


def pearson(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx * syy > 1e-24 else float("nan")
