"""Every key of the config schema (rlloop/config.py) is read by some code under rlloop/: a key nothing
reads is a promise the trainer does not keep (issue 22, "every config key is true").

The reader search is textual. A field name that only one section of the schema uses (kl_target) counts
as read wherever `.kl_target`, `["kl_target"]` or `get("kl_target"` appears outside config.py. A name
several sections share (name, lr, path, enabled, ...) would be found for any of them, so it must be read
through its own section: `prm.lr`, `p.lr` in a function handed `cfg.reward.prm`... which a grep cannot
see; those are listed below with the reader that consumes them.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections import Counter

from rlloop import config as schema
from tests.conftest import ROOT

SOURCES = {
    p: p.read_text() for p in sorted((ROOT / "rlloop").rglob("*.py")) if p.name != "config.py" or p.parent.name != "rlloop"
}
ALL = "\n".join(SOURCES.values())

# Keys read dynamically, each with its reader (a key listed here that the search finds anyway fails the
# test, so the list cannot grow stale).
READ_DYNAMICALLY = {
    # rollout.vllm.* is passed whole as keyword arguments to the vLLM engine (controller: **to_dict(r.vllm));
    # VLLMEngine's parameter of that name reads it
    "rollout.vllm.enforce_eager",
    # cluster.<role> is looked up by role name (placement.py: `res = c[role]`, c = cfg.cluster, for each
    # role), then `res.num_cpus` / `res.num_gpus`
    "cluster.learner.num_cpus",
    "cluster.rollout.num_cpus",
    "cluster.critic.num_cpus",
    "cluster.critic.num_gpus",
    # wandb.* is handed whole to the tracker as a dict (tracking.py: cfg.get("name") in _init_wandb)
    "wandb.name",
}


def leaf_keys(cls: type = schema.Config, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of the schema (a Dict/List field is a leaf)."""
    hints = typing.get_type_hints(cls, vars(schema))
    out = []
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            out += leaf_keys(sub, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _read(key: str, shared: set[str]) -> bool:
    *parents, field = key.split(".")
    if field not in shared:
        return re.search(rf"""\.{field}\b|["']{field}["']""", ALL) is not None
    # a shared name: read through its own section's name (cfg.reward.prm.lr, prm["lr"]) or a variable
    # bound to that section (`p = cfg.reward.prm` ... `p.lr`) in the same file
    section = parents[-1] if parents else None
    if section is None:
        return re.search(rf"\bcfg\.{field}\b|\bcfg\[[\"']{field}", ALL) is not None
    bound = rf"\b(\w+)\s*=\s*[\w.]*\b{section}\b\s*$"
    for text in SOURCES.values():
        if re.search(rf"\b{section}\.{field}\b|\b{section}\[[\"']{field}[\"']\]", text):
            return True
        for var in set(re.findall(bound, text, flags=re.M)) | set(re.findall(rf"\b(\w+)\s*=\s*[\w.]*\b{section}\b,", text)):
            if re.search(rf"\b{var}\.{field}\b|\b{var}\[[\"']{field}[\"']\]", text):
                return True
    return False


def test_every_schema_key_is_read():
    keys = leaf_keys()
    counts = Counter(k.rsplit(".", 1)[-1] for k in keys)
    shared = {name for name, n in counts.items() if n > 1}
    unread = [k for k in keys if k not in READ_DYNAMICALLY and not _read(k, shared)]
    assert not unread, f"schema keys no code under rlloop/ reads (delete them, or list the reader): {unread}"
    stale = [k for k in READ_DYNAMICALLY if k not in keys or _read(k, shared)]
    assert not stale, f"READ_DYNAMICALLY lists keys the schema lacks or the search finds anyway: {stale}"


def test_the_reader_search_would_catch_an_unread_key():
    keys = leaf_keys()
    assert "algo.kl_target" in keys and "reward.prm.td" in keys and "algo.critic.value_clip" in keys
    counts = Counter(k.rsplit(".", 1)[-1] for k in keys)
    shared = {name for name, n in counts.items() if n > 1} | {"name"}
    assert not _read("algo.name", shared)  # the deleted keys: `.name` is read, but never as algo's
    assert not _read("reward.name", shared)
    assert not _read("algo.no_such_key_anywhere", shared)
