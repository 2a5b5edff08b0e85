"""Code-sandbox start-up cost per program: bubblewrap isolation vs none, side by side in one run.

    python benchmarks/sandbox_startup.py [--n 40] [--write]

Each sample is one whole sandboxed run of a trivial program, wall time from the trusted side: for "io",
`run_io("print(1)")` (start, run, exit, stdout read); for "call", one assert-style test
(`assert f(1) == 2`: start, the program's top level, one call and its answer, kill). The two isolations
alternate sample by sample, so a change in machine load hits both alike. Medians and p90 in ms.
`--write` replaces the "## Code sandbox start-up" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import re
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rlloop.rewards.verifiers.code import run_assert_test  # noqa: E402
from rlloop.rewards.verifiers.sandbox import SandboxLimits, run_io, warm_up  # noqa: E402

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
SECTION = "## Code sandbox start-up"
LIMITS = SandboxLimits(wall_s=10, cpu_s=10)


def one(kind: str, isolation: str) -> float:
    t0 = time.perf_counter()
    if kind == "io":
        result = run_io("print(1)", "", LIMITS, isolation)
        assert result.completed and result.stdout == "1\n", result
    else:
        why = run_assert_test("def f(x):\n    return x + 1\n", "assert f(1) == 2", {}, LIMITS, isolation)
        assert why == "", why
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=40, help="samples per kind and isolation")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    assert warm_up("bwrap") == "bwrap", "bubblewrap is not usable here"
    warm_up("none", allow_unisolated=True)  # logs the loud warning once; this is a measurement
    times: dict[tuple[str, str], list[float]] = {}
    for kind in ("io", "call"):
        for _ in range(3):  # warm the page cache for both
            one(kind, "bwrap"), one(kind, "none")
        for _ in range(args.n):
            for isolation in ("bwrap", "none"):
                times.setdefault((kind, isolation), []).append(one(kind, isolation))
    load_after = os.getloadavg()[0]
    rows = []
    for kind in ("io", "call"):
        base = statistics.median(times[(kind, "none")])
        for isolation in ("none", "bwrap"):
            xs = sorted(times[(kind, isolation)])
            med = statistics.median(xs)
            p90 = xs[int(0.9 * (len(xs) - 1))]
            rows.append(f"| {kind} | {isolation} | {len(xs)} | {med:.1f} | {p90:.1f} | +{med - base:.1f} |")
    table = "\n".join(
        [
            "| test kind | isolation | runs | median ms/program | p90 ms | added vs none (median) |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    text = (
        f"{SECTION}\n\n"
        f"Command: `python benchmarks/sandbox_startup.py --n {args.n} --write`\n\n"
        f"Machine: {os.cpu_count()} cores ({platform.machine()}), shared with other engineers' jobs; load "
        f"average {load_before:.2f} before, {load_after:.2f} after. {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
        "One whole run per program, wall time on the trusted side; isolations alternate run by run. `none` "
        "is the opt-in unisolated mode (a plain child process, same runner, same rlimits); `bwrap` adds the "
        "namespaces, the read-only binds and three tmpfs mounts. `io`: `print(1)` with stdout compared; "
        "`call`: one assert-style test, `f(1)` called from the trusted side.\n\n"
        f"{table}\n"
    )
    print(text)
    if args.write:
        current = RESULTS.read_text()
        if SECTION in current:
            current = re.sub(
                rf"{re.escape(SECTION)}\n.*?(?=\n## |\Z)", text.rstrip("\n") + "\n", current, flags=re.S
            )
        else:
            current = current.rstrip("\n") + "\n\n" + text
        RESULTS.write_text(current)


if __name__ == "__main__":
    main()
