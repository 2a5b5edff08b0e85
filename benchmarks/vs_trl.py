"""rlloop (sync mode) vs TRL's GRPOTrainer on the same model, prompts and GRPO settings (CPU).

Each run is a fresh subprocess (rlloop: `python -m rlloop.train ...`; TRL: this file with `--trl-worker`), so
start-up is measured too. Runs alternate between systems (A B A B ...) so load on a shared machine hits both.

Measured per run:
- wall_s: subprocess start to exit; startup_s = wall_s - sum of per-step times.
- s_per_step: median of the per-step times (rlloop: `time/step` from metrics.jsonl; TRL: a TrainerCallback's
  on_step_begin -> on_step_end, which includes generation since TRL generates inside its training step).
- samples_per_s: prompts_per_step * n * steps / wall_s (end to end, start-up included).
- peak_rss_gb: the largest sum of RSS over every process of the run, sampled every 0.5 s. The processes
  of a run are the subprocess's process tree plus any process whose environment holds this run's marker
  `RLLOOP_BENCH_RUN=<id>` (Ray's raylet and workers inherit the driver's environment, so they carry it even
  if they are not descendants); other people's Ray clusters on the machine do not. RSS summed over
  processes counts shared pages (torch's libraries) once per process, so peak_pss_gb (proportional set
  size, shared pages split between processes) is reported too; for TRL's single process they nearly agree.
- per role (rlloop): peak summed RSS (and PSS) of processes grouped by title (`ray::LearnerActor` ->
  learner, ...).
- reward_last: mean reward of the last step's completions (rlloop `reward/total`, TRL `reward`).

Usage (see benchmarks/RESULTS.md for the commands behind the published table):
    python benchmarks/vs_trl.py --model tiny --prompts-per-step 4 --n 8 --max-new-tokens 96 --steps 3 --runs 3
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from rlloop.distributed.env import without_dist_env

logger = logging.getLogger("vs_trl")

REPO = Path(__file__).resolve().parent.parent
MARKER = "RLLOOP_BENCH_RUN"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ----------------------------------------------------------------------------------------------- memory
def _role(proc: Any, root_pid: int) -> str:
    """Which rlloop role a process plays, from its title (Ray sets `ray::<ActorClass>` as the title)."""
    if proc.pid == root_pid:
        return "controller"
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:
        return "other"
    if cmd.startswith("ray::"):
        name = cmd.split()[0][5:]
        for key, role in (
            ("Learner", "learner"),
            ("Rollout", "rollout"),
            ("Search", "rollout"),
            ("PRM", "prm"),
            ("Verif", "verifier"),
        ):
            if key in name:
                return role
        return "ray-idle-worker" if name.startswith("IDLE") else f"ray-other({name})"
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if key in cmd:
            return "ray-system"
    if "verifier" in cmd or "sandbox" in cmd:
        return "verifier"
    return "other"


class MemorySampler:
    """Samples summed RSS/PSS over a run's processes in a thread until `stop()`; see the module docstring."""

    def __init__(self, root_pid: int, run_id: str, interval_s: float = 0.5):
        self.root_pid, self.run_id, self.interval_s = root_pid, run_id, interval_s
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_role: dict[str, int] = {}
        self.peak_role_pss: dict[str, int] = {}
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _procs(self) -> list[Any]:
        import psutil

        found: dict[int, Any] = {}
        try:
            root = psutil.Process(self.root_pid)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            pass
        me = os.getuid()
        for proc in psutil.process_iter(["pid", "uids"]):
            if proc.pid in found:
                continue
            try:
                if proc.info["uids"] is None or proc.info["uids"].real != me:
                    continue
                if proc.environ().get(MARKER) == self.run_id:
                    found[proc.pid] = proc
            except psutil.Error:
                continue
        return list(found.values())

    def sample(self) -> None:
        import psutil

        rss_total, pss_total, roles, roles_pss = 0, 0, {}, {}
        procs = self._procs()
        for proc in procs:
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            rss_total += info.rss
            pss = getattr(info, "pss", info.rss)
            pss_total += pss
            role = _role(proc, self.root_pid)
            roles[role] = roles.get(role, 0) + info.rss
            roles_pss[role] = roles_pss.get(role, 0) + pss
        self.max_procs = max(self.max_procs, len(procs))
        self.peak_rss = max(self.peak_rss, rss_total)
        self.peak_pss = max(self.peak_pss, pss_total)
        for role, rss in roles.items():
            self.peak_role[role] = max(self.peak_role.get(role, 0), rss)
        for role, pss in roles_pss.items():
            self.peak_role_pss[role] = max(self.peak_role_pss.get(role, 0), pss)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# ----------------------------------------------------------------------------------------------- runs
def _run_measured(
    cmd: list[str], log_path: Path, timeout_s: float, extra_env: dict[str, str] | None = None
) -> tuple[float, MemorySampler, int]:
    run_id = uuid.uuid4().hex
    env = dict(os.environ, **{MARKER: run_id}, **(extra_env or {}))
    env = without_dist_env(env)  # each measured run is its own process group
    # thread counts are each system's own: torch's default (all cores) for TRL's one process, the config's
    # *.num_threads for rlloop's actors; a caller's OMP_NUM_THREADS=1 would leave TRL one core of two
    for key in THREAD_ENV:
        env.pop(key, None)
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = MemorySampler(proc.pid, run_id)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            logger.error("%s timed out after %.0f s", cmd[:4], timeout_s)
        wall = time.perf_counter() - t0
        sampler.stop()
    return wall, sampler, rc


def _summarise(
    system: str,
    wall: float,
    sampler: MemorySampler,
    steps: list[dict],
    reward_key: str,
    a,
    eval_s: float = 0.0,
) -> dict:
    """`eval_s`: rlloop's final held-out evaluation (it always runs one after the last step; TRL runs none).
    It is left out of samples_per_s and startup_s so both systems are timed on the same work; wall_s keeps it."""
    step_times = [s["time/step"] for s in steps]
    out = {
        "system": system,
        "wall_s": wall,
        "final_eval_s": eval_s,
        "steps_done": len(steps),
        "startup_s": wall - eval_s - sum(step_times),
        "s_per_step": statistics.median(step_times) if step_times else math.nan,
        "samples_per_s": a.prompts_per_step * a.n * len(steps) / (wall - eval_s) if steps else math.nan,
        "peak_rss_gb": sampler.peak_rss / 2**30,
        "peak_pss_gb": sampler.peak_pss / 2**30,
        "max_procs": sampler.max_procs,
        "peak_rss_gb_by_role": {k: v / 2**30 for k, v in sorted(sampler.peak_role.items())},
        "peak_pss_gb_by_role": {k: v / 2**30 for k, v in sorted(sampler.peak_role_pss.items())},
        "reward_last": steps[-1].get(reward_key, math.nan) if steps else math.nan,
        "step_times": step_times,
    }
    lengths = [s[k] for s in steps for k in ("response_length/mean", "completions/mean_length") if k in s]
    out["response_len_mean"] = statistics.mean(lengths) if lengths else math.nan
    # rlloop's learner: model FLOPs per second of the update (perf/model_flops, rlloop/learner/policy.py)
    # and their share of this machine's measured fp32 matmul peak (MFU); padding = positions computed
    # beyond the real tokens
    work = [s for s in steps if s.get("perf/model_flops") and s.get("time/learner")]
    if work:
        flops_s = statistics.median(s["perf/model_flops"] / s["time/learner"] for s in work)
        out["learner_gflops_s"] = flops_s / 1e9
        out["learner_mfu"] = flops_s / a.peak_flops if getattr(a, "peak_flops", None) else math.nan
        out["padding_frac"] = statistics.median(1 - s["perf/tokens"] / s["perf/computed_tokens"] for s in work)
    times = (
        {k: statistics.median(s[k] for s in steps) for k in steps[0] if k.startswith("time/")}
        if steps
        else {}
    )
    out["time_breakdown"] = times
    return out


# rlloop's training modes: sync (generate, then learn) and one-step-off-policy async (the next batch is
# generated while the learner updates; importance weights capped at 2 correct the one version of lag)
MODES = {"sync": [], "async": ["trainer.async_mode=one_step", "trainer.max_staleness=1", "algo.tis_cap=2.0"]}


def run_rlloop(a, run_dir: Path, world_size: int, reward: str, mode: str = "sync", mmap1m: bool = False) -> dict:
    pn = a.prompts_per_step * a.n
    cmd = [
        sys.executable, "-m", "rlloop.train",
        f"model={a.model}", f"reward={reward}", *([f"task={a.task}"] if a.task else []),
        f"rollout.prompts_per_step={a.prompts_per_step}", f"rollout.n={a.n}",
        f"rollout.max_new_tokens={a.max_new_tokens}", f"rollout.temperature={a.temperature}",
        f"learner.lr={a.lr}", "algo.kl_coef=0", "algo.use_ref=false",  # TRL with beta=0 loads no reference
        f"learner.world_size={world_size}", f"learner.micro_batch_size={max(1, pn // world_size)}",
        # one rank: no ZeRO partitioning (conf/learner/single.yaml); ZeRO-2 otherwise (conf/learner/zero2.yaml)
        f"learner.zero_stage={0 if world_size == 1 else 2}",
        f"trainer.total_steps={a.steps}", f"trainer.seed={a.seed}",
        "trainer.eval_before=false", "trainer.eval_every=0", "trainer.save_final=false",
        "logger=[jsonl]", f"hydra.run.dir={run_dir}",
        f"learner.gradient_checkpointing={str(a.gradient_checkpointing).lower()}",
        *MODES[mode],
        *(["learner.malloc_mmap_threshold_mb=1"] if mmap1m else []),
        *a.rlloop_override,
    ]  # fmt: skip
    wall, sampler, rc = _run_measured(cmd, run_dir.with_suffix(".log"), a.timeout_s)
    metrics = run_dir / "metrics.jsonl"
    steps = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if metrics.exists()
        else []
    )
    eval_s = sum(s.get("time/eval", 0.0) for s in steps)
    steps = [s for s in steps if "time/step" in s]
    name = f"rlloop-ws{world_size}" + ("" if reward == "rule" else f"-{reward}") + ("" if mode == "sync" else f"-{mode}")
    name += "-mmap1m" if mmap1m else ""
    name += _engine_suffix(a)
    out = _summarise(name, wall, sampler, steps, "reward/total", a, eval_s)
    out["rc"] = rc
    out["log"] = str(run_dir.with_suffix(".log"))
    return out


def _engine_suffix(a) -> str:
    """'-vllm' when the rlloop runs generate with the vLLM engine (in the summary name and the run folder)."""
    return "-vllm" if any(o in ("rollout=vllm", "rollout.engine=vllm") for o in a.rlloop_override) else ""


# each system as users run it, and with glibc's mmap threshold fixed at 1 MiB (rlloop: in its learner ranks,
# learner.malloc_mmap_threshold_mb=1; TRL: its one process, by environment): memory at equal allocator settings
RLLOOP_SYSTEMS = ("rlloop", "rlloop-mmap1m")
TRL_SYSTEMS = {"trl": {}, "trl-mmap1m": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


def run_trl(a, run_dir: Path, system: str = "trl") -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", "--out", str(run_dir)]
    for key in ("model", "prompts_per_step", "n", "max_new_tokens", "temperature", "lr", "steps", "seed"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(a, key))]
    if a.task:
        cmd += ["--task", a.task]
    # rlloop's task.* overrides shape the train split (arith's test questions are kept out of it): the
    # TRL worker builds the same split, so that both draw the same prompts
    cmd += [f"--rlloop-override={o}" for o in a.rlloop_override if o.startswith("task.")]
    if a.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    wall, sampler, rc = _run_measured(cmd, run_dir.with_suffix(".log"), a.timeout_s, TRL_SYSTEMS[system])
    metrics = run_dir / "metrics.jsonl"
    steps = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if metrics.exists()
        else []
    )
    out = _summarise(system, wall, sampler, steps, "reward", a)
    out["rc"] = rc
    out["log"] = str(run_dir.with_suffix(".log"))
    return out


# ----------------------------------------------------------------------------------------------- TRL side
def trl_worker(a) -> None:
    """Runs inside the TRL subprocess: GRPOTrainer with the settings rlloop gets, logging one line per step."""
    import torch
    from datasets import Dataset
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlloop.config import ModelConfig, TaskConfig
    from rlloop.controller import PromptStream
    from rlloop.data.loader import build_datasets, chat_messages
    from rlloop.models import resolve_model
    from rlloop.rewards.verifiers.base import VerifyRequest
    from rlloop.rewards.verifiers.math import verify_math

    torch.manual_seed(a.seed)
    task_overrides = [o.removeprefix("task.") for o in a.rlloop_override if o.startswith("task.")]
    if a.task:  # a preset (conf/task), composed as rlloop composes it: prompt template, system prompt, split
        from rlloop.train import compose_config

        task_cfg = compose_config([f"task={a.task}", *(f"task.{o}" for o in task_overrides)]).task
    else:
        task_cfg = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.from_dotlist(task_overrides))
    model_cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model" / f"{a.model}.yaml")
    )
    path = resolve_model(model_cfg, task_cfg)
    train, _ = build_datasets(task_cfg)
    # the prompts rlloop trains on, in its order (its controller's PromptStream with trainer.seed); TRL
    # walks them unshuffled, prompts_per_step per step
    rows = [
        {
            "prompt": chat_messages(s, task_cfg),
            "ground_truth": str(s.ground_truth),
            "data_source": s.data_source,
        }
        for s in PromptStream(train, a.seed).take(a.prompts_per_step * a.steps)
    ]
    dataset = Dataset.from_list(rows)

    def math_reward(completions, ground_truth, **kwargs) -> list[float]:
        # the same check rlloop's `math` verifier makes: last \boxed{} vs the gold answer with math-verify
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [
            verify_math(VerifyRequest(uid=str(i), data_source="arith", solution_str=t, ground_truth=g)).score
            for i, (t, g) in enumerate(zip(texts, ground_truth))
        ]

    out = Path(a.out)
    log = open(out / "metrics.jsonl", "w")

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.dt = time.perf_counter() - self.t0

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                row = {"step": state.global_step, "time/step": self.dt, "reward": logs["reward"]}
                row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
                log.write(json.dumps(row) + "\n")
                log.flush()

    pn = a.prompts_per_step * a.n
    cfg = GRPOConfig(
        output_dir=str(out / "trl_out"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=pn,
        gradient_accumulation_steps=1,
        num_generations=a.n,
        max_completion_length=a.max_new_tokens,
        temperature=a.temperature,
        top_p=1.0,
        learning_rate=a.lr,
        lr_scheduler_type="constant",  # rlloop's learner keeps lr fixed
        adam_beta2=0.99,  # rlloop's learner.betas
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",  # token-mean over the batch = rlloop's algo.loss_agg=token-mean
        epsilon=0.2,
        scale_rewards="group",
        num_iterations=1,
        shuffle_dataset=False,  # the dataset is already in rlloop's order
        # GRPOConfig's default is True; both sides the same (--gradient-checkpointing, off by default)
        gradient_checkpointing=a.gradient_checkpointing,
        max_steps=a.steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=a.seed,
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[math_reward],
        args=cfg,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    log.close()


# ----------------------------------------------------------------------------------------------- report
def _median(results: list[dict], key: str) -> float:
    vals = [r[key] for r in results if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return statistics.median(vals) if vals else math.nan


def matmul_peak_flops(threads: int, n: int = 1024, reps: int = 24, timings: int = 5) -> float:
    """This machine's fp32 matmul FLOP/s on `threads` threads: the best of `timings` timings of `reps`
    n x n products (the denominator of the learner's MFU). A peak is a best case: the benchmark measures
    it before and after its runs and keeps the higher (one short measurement read 100-205 GFLOP/s on
    the same machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, y = torch.randn(n, n), torch.randn(n, n)
        x @ y  # warm-up
        best = math.inf
        for _ in range(timings):
            t0 = time.perf_counter()
            for _ in range(reps):
                x @ y
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 * reps / best
    finally:
        torch.set_num_threads(before)


def table(results: list[dict]) -> tuple[str, dict]:
    systems = list(dict.fromkeys(r["system"] for r in results))
    keys = [
        "samples_per_s",
        "s_per_step",
        "startup_s",
        "final_eval_s",
        "wall_s",
        "peak_rss_gb",
        "peak_pss_gb",
        "reward_last",
        "response_len_mean",
        "learner_gflops_s",
        "learner_mfu",
        "padding_frac",
    ]
    med = {s: {k: _median([r for r in results if r["system"] == s], k) for k in keys} for s in systems}
    for s in systems:
        med[s]["runs"] = sum(r["system"] == s for r in results)
    lines = [
        "| system | runs | samples/s (end to end) | s/step (median) | start-up s | final eval s | wall s | peak RSS GB (sum) | peak PSS GB | reward after last step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in systems:
        m = med[s]
        lines.append(
            f"| {s} | {m['runs']} | {m['samples_per_s']:.3f} | {m['s_per_step']:.2f} | {m['startup_s']:.1f} | {m['final_eval_s']:.1f} | "
            f"{m['wall_s']:.1f} | {m['peak_rss_gb']:.2f} | {m['peak_pss_gb']:.2f} | {m['reward_last']:.3f} |"
        )
    learners = [s for s in systems if not math.isnan(med[s].get("learner_mfu", math.nan))]
    if learners:
        # positions the learner computed per real token: > 1 is padding, < 1 prompts computed once for
        # several rows (learner.batching=packed); padding_frac = 1 - real / computed
        lines += ["", "| system | response tokens (mean) | learner GFLOP/s | learner MFU | positions computed per real token |", "|---|---|---|---|---|"]
        for s in learners:
            m = med[s]
            lines.append(
                f"| {s} | {m['response_len_mean']:.1f} | {m['learner_gflops_s']:.2f} | {m['learner_mfu']:.3f} | {1 / (1 - m['padding_frac']):.3f} |"
            )
    if "trl" in med:
        lines.append("")
        lines.append("| ratio vs TRL | samples/s | s/step | peak RSS | peak PSS | reward |")
        lines.append("|---|---|---|---|---|---|")
        t = med["trl"]
        for s in systems:
            if s == "trl":
                continue
            m = med[s]
            r = {k: (m[k] / t[k] if t[k] else math.nan) for k in keys}
            lines.append(
                f"| {s} / trl | {r['samples_per_s']:.2f} | {r['s_per_step']:.2f} | {r['peak_rss_gb']:.2f} | "
                f"{r['peak_pss_gb']:.2f} | {r['reward_last']:.2f} |"
            )
    return "\n".join(lines), med


def recompute(json_path: Path) -> None:
    """Re-apply the final-eval correction (see `_summarise`) to a results.json and rewrite its table."""
    report = json.loads(json_path.read_text())
    args = report["args"]
    pn = args["prompts_per_step"] * args["n"]
    for r in report["runs"]:
        r.setdefault("final_eval_s", 0.0)
        if not r["system"].startswith("rlloop"):
            continue
        run_dir = Path(r.get("run_dir") or json_path.parent / f"{r['system']}-rule-run{r['run']}")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        eval_s = sum(x.get("time/eval", 0.0) for x in rows)
        r["final_eval_s"] = eval_s
        r["startup_s"] = r["wall_s"] - eval_s - sum(r["step_times"])
        r["samples_per_s"] = pn * r["steps_done"] / (r["wall_s"] - eval_s)
    md, report["median"] = table(report["runs"])
    json_path.write_text(json.dumps(report, indent=2, default=str))
    (json_path.parent / "table.md").write_text(md + "\n")
    print(md)


def environment() -> dict:
    import platform

    import psutil

    versions = {}
    for mod in ("torch", "transformers", "trl", "ray", "deepspeed", "accelerate"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as exc:  # a missing optional package is reported, not fatal
            versions[mod] = f"unavailable ({type(exc).__name__})"
    return {
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="rlloop model name: tiny | arith-small | smollm2")
    p.add_argument(
        "--task", default=None, help="task preset for both systems, e.g. arith-oneshot (default: arith's fields)"
    )
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--systems",
        default="rlloop,trl",
        help="comma list of rlloop, rlloop-mmap1m (learner.malloc_mmap_threshold_mb=1), trl, trl-mmap1m "
        "(TRL with MALLOC_MMAP_THRESHOLD_=1 MiB)",
    )
    p.add_argument("--world-sizes", default="1", help="rlloop learner.world_size values, e.g. 1,2")
    p.add_argument("--rewards", default="rule", help="rlloop reward configs, e.g. rule,tdrm")
    p.add_argument("--modes", default="sync", help="rlloop training modes: sync and/or async (one step off-policy)")
    p.add_argument("--out", default="outputs/bench_vs_trl")
    p.add_argument("--json", default=None, help="write all results here (default: <out>/results.json)")
    p.add_argument(
        "--rlloop-override",
        action="append",
        default=[],
        help="extra Hydra override for rlloop (repeatable), e.g. task.num_test=4 to shorten its final eval",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="both systems recompute activations in the backward (TRL's default; off: neither does)",
    )
    p.add_argument("--timeout-s", type=float, default=3600)
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--recompute", default=None, help="re-derive the table from a results.json and its run dirs"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if a.trl_worker:
        trl_worker(a)
        return 0
    if a.recompute:
        recompute(Path(a.recompute))
        return 0

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = set(systems) - {*RLLOOP_SYSTEMS, *TRL_SYSTEMS}
    if bad:
        p.error(f"--systems: unknown {sorted(bad)}; use some of {', '.join([*RLLOOP_SYSTEMS, *TRL_SYSTEMS])}")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if set(modes) - set(MODES):
        p.error(f"--modes: unknown {sorted(set(modes) - set(MODES))}; use {' and/or '.join(MODES)}")
    variants: list[tuple[str, int, str, str]] = []
    for s in systems:
        if s in RLLOOP_SYSTEMS:
            variants += [
                (s, int(w), r, m)
                for m in modes
                for r in a.rewards.split(",")
                for w in a.world_sizes.split(",")
            ]
        else:
            variants.append((s, 0, "", ""))
    env = environment()
    a.peak_flops = matmul_peak_flops(2)
    env["matmul_peak_gflops_2_threads"] = a.peak_flops / 1e9
    logger.info("fp32 matmul peak on 2 threads: %.1f GFLOP/s", a.peak_flops / 1e9)
    results: list[dict] = []
    loads = []
    for run in range(a.runs):
        for system, ws, reward, mode in variants:  # interleaved: A B A B ...
            tag = (
                f"{system}-ws{ws}-{reward}-{mode}{_engine_suffix(a)}-run{run}"
                if system in RLLOOP_SYSTEMS
                else f"{system}-run{run}"
            )
            loads.append(os.getloadavg()[0])
            logger.info("run %s (load %.1f)", tag, loads[-1])
            res = (
                run_rlloop(a, out / tag, ws, reward, mode, mmap1m=system == "rlloop-mmap1m")
                if system in RLLOOP_SYSTEMS
                else run_trl(a, out / tag, system)
            )
            res["run"], res["run_dir"] = run, str(out / tag)
            results.append(res)
            logger.info(
                "%s: rc %s, %d steps, wall %.1f s, %.2f s/step, peak RSS %.2f GB, reward %.3f",
                tag, res["rc"], res["steps_done"], res["wall_s"], res["s_per_step"], res["peak_rss_gb"],
                res["reward_last"],
            )  # fmt: skip
    env["loadavg_during_median"] = statistics.median(loads) if loads else math.nan
    after = matmul_peak_flops(2)
    env["matmul_peak_gflops_2_threads_after"] = after / 1e9
    if after > a.peak_flops:  # the peak is the best measured: MFU against it
        a.peak_flops = after
        env["matmul_peak_gflops_2_threads"] = after / 1e9
        for r in results:
            if math.isfinite(r.get("learner_gflops_s", math.nan)):
                r["learner_mfu"] = r["learner_gflops_s"] * 1e9 / after
    logger.info("fp32 matmul peak on 2 threads after the runs: %.1f GFLOP/s", after / 1e9)
    md, med = table(results)
    report = {"args": {k: v for k, v in vars(a).items() if k != "trl_worker"}, "env": env,
              "median": med, "runs": results, "command": " ".join([Path(sys.executable).name, *sys.argv])}  # fmt: skip
    json_path = Path(a.json) if a.json else out / "results.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    (out / "table.md").write_text(md + "\n")
    print(md)
    rl = next((s for s in med if s.startswith("rlloop")), None)
    if rl and "trl" in med:  # the one-line summary issue 23 asks for (medians)
        r, t = med[rl], med["trl"]
        print(
            f"vs_trl: model={a.model} system={rl} samples_per_s_ratio={r['samples_per_s'] / t['samples_per_s']:.2f} "
            f"rss_ratio={r['peak_rss_gb'] / t['peak_rss_gb']:.2f} learner_mfu={r.get('learner_mfu', math.nan):.3f}"
        )
    print(f"\nresults: {json_path}")
    failed = [r for r in results if r["rc"] != 0 or r["steps_done"] < a.steps]
    if failed:
        logger.error(
            "%d run(s) failed or stopped early: %s", len(failed), [(r["system"], r["run"]) for r in failed]
        )
        for r in failed:  # the cause is in the run's own log; show its end so a CI failure says why
            log = Path(r["log"])
            tail = log.read_text(errors="replace")[-2500:] if log.exists() else "(no log)"
            logger.error("last lines of %s:\n%s", log, tail)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
