"""`rlloop <command> [args]` (also `python -m rlloop <command>`): one command for every rlloop entry point.

Each command runs the same `main` as `python -m rlloop.<module>` with the rest of the command line, so
`rlloop train model=tiny` and `python -m rlloop.train model=tiny` are the same run, and `rlloop <command>
--help` prints that entry point's own help (Hydra's for the Hydra commands). The command's module is
imported only when it is chosen: `rlloop --help` starts in a fraction of a second, and a command whose
module is missing from this installation fails with its name instead of breaking the others.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    target: str  # "module:function"; the function is the module's `python -m` entry point
    summary: str
    takes_argv: bool = False  # main(argv); else main() reads sys.argv (Hydra's entry points)


COMMANDS: dict[str, Command] = {
    "train": Command("rlloop.train:main", "one RL run (Hydra overrides, e.g. model=tiny trainer.total_steps=1)"),
    "eval": Command("rlloop.evaluate:main", "evaluate a checkpoint or model on named eval sets", takes_argv=True),
    "export": Command("rlloop.export:main", "write a HF model folder from a run's checkpoint", takes_argv=True),
    "prm-train": Command("rlloop.prm_train:main", "train a process reward model offline (TD or labels)"),
    "qrm-train": Command("rlloop.qrm_train:main", "train a token-level Q-RM on preference pairs"),
    "search": Command("rlloop.search.cli:main", "PRM-guided Best-of-N and step beam search on a task"),
    "check-data": Command("rlloop.check_data:main", "show the first rendered prompt; list golds that do not verify", takes_argv=True),
    "verify-reward": Command("rlloop.verify_reward:main", "dry-run the reward function over N rows", takes_argv=True),
    "sft": Command("rlloop.sft:main", "pretrain a built-in model (arith-small, chain-small)"),
    "rollout": Command("rlloop.rollout.__main__:_main", "sample verified rollouts to jsonl (PRM/Q-RM data)"),
    "qrm-pairs": Command("rlloop.qrm_pairs:main", "build Q-RM preference pairs from verified rollouts"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(
        [
            "usage: rlloop <command> [args]   (the same: python -m rlloop <command> [args])",
            "",
            "commands:",
            *(f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()),
            "",
            "`rlloop <command> --help` lists a command's own options. Most commands take key=value overrides",
            "of rlloop's config tree (`rlloop train --cfg job` prints the composed config; docs/config.md",
            "lists every key).",
        ]
    )


def _entry(command: str):
    """The entry-point function of `command`, imported now; SystemExit(2) naming it when missing."""
    module_name, _, function = COMMANDS[command].target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name and not module_name.startswith(f"{err.name}."):
            raise  # a dependency of the command's module is missing, not the module: its own message
        print(f"error: `rlloop {command}` is not available in this installation ({module_name} is missing)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2) from None
    return getattr(module, function)


def main(argv: list[str] | None = None) -> None:
    """Dispatch `argv` (default sys.argv[1:]) to its command's entry point."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        from rlloop import __version__

        print(f"rlloop {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        hint = f"; did you mean `rlloop train {' '.join(argv)}`?" if "=" in command else ""
        print(f"error: {command!r} is not an rlloop command (choose from {', '.join(COMMANDS)}){hint}",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    entry = _entry(command)
    # Hydra's and argparse's entry points read sys.argv; the command word is not theirs
    sys.argv = [sys.argv[0], *rest]
    if COMMANDS[command].takes_argv:
        entry(rest)
    else:
        entry()


if __name__ == "__main__":
    main()
