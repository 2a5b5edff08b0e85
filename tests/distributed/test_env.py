"""without_dist_env: children of a process in a torch.distributed group start outside it."""

from rlloop.distributed.env import DIST_ENV_KEYS, without_dist_env


def test_rendezvous_variables_removed_others_kept(monkeypatch):
    env = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "5",
        "PATH": "/bin",
    }
    assert without_dist_env(env) == {"PATH": "/bin"}
    assert env["MASTER_PORT"] == "5"  # the caller's mapping is not changed
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RLLOOP_X", "1")
    child = without_dist_env()
    assert not set(DIST_ENV_KEYS) & set(child) and child["RLLOOP_X"] == "1"
