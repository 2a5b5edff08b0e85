"""Verifiable rewards: a registry of verifiers (math, code, format, custom) and the Ray `VerifierPool`.

Importing this package registers the built-in verifiers.
"""

from rlloop.rewards.verifiers import code, custom, format, math  # noqa: F401  (registers the built-ins)
from rlloop.rewards.verifiers.base import (
    VerifyRequest,
    VerifyResult,
    get_verifier,
    list_verifiers,
    register_verifier,
)

__all__ = [
    "VerifyRequest",
    "VerifyResult",
    "VerifierPool",
    "get_verifier",
    "list_verifiers",
    "register_verifier",
]


def __getattr__(name: str):
    # The pool pulls in Ray; keep `import rlloop.rewards.verifiers` light for worker processes.
    if name == "VerifierPool":
        from rlloop.rewards.verifiers.pool import VerifierPool

        return VerifierPool
    raise AttributeError(name)
