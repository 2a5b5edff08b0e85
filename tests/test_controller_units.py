"""Controller pieces that need no actors: prompt stream, batch layout, TDRM's answer-step value, tracker."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlloop.batch import (
    answer_step,
    build_batch,
    format_step_values,
    group_index,
    step_tensors,
    verifier_metrics,
)
from rlloop.controller import PromptStream, step_overhead
from rlloop.distributed.procmem import peak_rss_gb
from rlloop.errors import RlloopError
from rlloop.tracking import Tracker, read_metrics, redact
from rlloop.types import Rollout, Sample


def _samples(n):
    return [Sample(uid=f"s{i}", prompt=f"q{i}", data_source="arith", ground_truth=str(i)) for i in range(n)]


def test_prompt_stream_covers_each_epoch_once_and_is_seeded():
    stream = PromptStream(_samples(10), seed=3)
    first = [s.uid for s in stream.take(10)]
    assert sorted(first) == sorted(f"s{i}" for i in range(10))
    second = [s.uid for s in stream.take(10)]
    assert sorted(second) == sorted(first) and second != first  # a fresh shuffle per epoch
    again = PromptStream(_samples(10), seed=3)
    assert [s.uid for s in again.take(10)] == first
    assert stream.epoch == 1 and stream.pos == 10


def test_prompt_stream_rejects_empty():
    with pytest.raises(RlloopError, match="empty"):
        PromptStream([], seed=0)


def _rollout(prompt, response, text="", char_ends=(), values=None):
    return Rollout(
        uid="g/0",
        group="g",
        prompt_ids=prompt,
        response_ids=response,
        rollout_logprobs=[-0.5] * len(response),
        step_ends=[],
        step_char_ends=list(char_ends),
        text=text,
        prompt_text="p",
        finish_reason="stop",
        policy_version=0,
        step_values=values,
    )


def test_build_batch_layout_is_right_padded_and_aligned():
    batch = build_batch([_rollout([1, 2, 3], [4, 5]), _rollout([7], [8, 9, 10])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    np.testing.assert_allclose(batch.rollout_logprobs[1], [0, -0.5, -0.5, -0.5, 0])
    assert len(batch.select(np.array([1]))) == 1


def test_answer_step_and_the_value_before_it():
    text = "a = 1\n\nb = 2\n\nso \\boxed{3}"
    ro = _rollout([1], [2, 3, 4], text=text, char_ends=[5, 12, len(text)])
    ro.step_ends = [0, 1, 2]
    first = _rollout([1], [2], text="\\boxed{3}", char_ends=[9])
    first.step_ends = [0]
    none = _rollout([1], [2, 3], text="a\n\nb", char_ends=[1, 4])
    none.step_ends = [0, 1]
    assert [answer_step(r) for r in (ro, first, none)] == [2, 0, -1]
    prm_out = [
        {"prompt_value": 0.5, "step_values": [0.1, 0.2, 0.9]},
        {"prompt_value": 0.4, "step_values": [0.7]},
        {"prompt_value": 0.5, "step_values": [0.3, 0.6]},
    ]
    steps = step_tensors([ro, first, none], prm_out)
    from rlloop.algos.fusion import value_before_answer_step

    v = value_before_answer_step(steps["values"], steps["mask"], steps["answer_step"], steps["prompt_value"])
    # TDRM: V of the prefix before the answer step; the prompt's V if the answer is step 0; the last V if none.
    assert v.tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert steps["mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert group_index(["b", "a", "b"]).tolist() == [0, 1, 0]
    bad = [{"prompt_value": 0.5, "step_values": [0.1]}, *prm_out[1:]]
    with pytest.raises(RuntimeError, match="g/0"):
        step_tensors([ro, first, none], bad)


def test_tracker_writes_jsonl_and_redacts_secrets(tmp_path):
    tr = Tracker(["jsonl"], tmp_path, config={"wandb": {"api_key": "sk-123"}})
    tr.log({"a": 1.0, "b": float("nan")}, step=1)
    tr.finish()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "a": 1.0, "b": None}]
    assert json.dumps(redact({"wandb": {"api_key": "sk-123"}})).count("sk-123") == 0
    with pytest.raises(ValueError, match="nope"):
        Tracker(["nope"], tmp_path)


def test_step_overhead_hand_worked():
    # 10 s step: compute = generate 4 + prm_wait 0.5 + logprobs 1 + learner 2.5 = 8 s -> overhead 20%.
    # Phases cover 4 + 1 (verify) + 0.5 + 1 + 2.5 + 0.5 (sync) = 9.5 s -> 0.5 s idle. `prm` (replica
    # seconds, overlapping generate) counts neither as compute nor as covered time.
    seconds = {
        "generate": 4.0,
        "verify": 1.0,
        "prm": 3.0,
        "prm_wait": 0.5,
        "logprobs": 1.0,
        "learner": 2.5,
        "sync": 0.5,
        "step": 10.0,
    }
    out = step_overhead(seconds)
    assert out["time/idle"] == pytest.approx(0.5)
    assert out["time/overhead_frac"] == pytest.approx(0.2)


def test_step_overhead_edges():
    assert step_overhead({}) == {"time/idle": 0.0, "time/overhead_frac": 0.0}
    # Phases timed a hair longer than the step (clock granularity) never give negative idle or frac.
    out = step_overhead({"generate": 1.0, "learner": 0.2, "step": 1.1})
    assert out == {"time/idle": 0.0, "time/overhead_frac": 0.0}
    assert step_overhead({"verify": 2.0, "sync": 1.0, "step": 4.0}) == {
        "time/idle": 1.0,
        "time/overhead_frac": 1.0,
    }


def test_peak_rss_is_the_kernels_high_water_mark_in_gib():
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched: this process's peak is above it
    got = peak_rss_gb()
    hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    assert got * 2**30 >= block.nbytes
    assert got == pytest.approx(hwm_kib / 2**20, rel=0.05)  # KiB -> GiB, not MB or bytes


def test_format_step_values_shows_each_step_with_its_value():
    text = "3 + 4 = 7\n7 - 2 = 4\n\\boxed{4}"
    ends = [text.index("\n") + 1, text.rindex("\n") + 1, len(text)]
    ro = Rollout(
        uid="p1/0", group="p1", prompt_ids=[1], response_ids=[2], rollout_logprobs=[0.0], step_ends=[0],
        step_char_ends=ends, text=text, prompt_text="", finish_reason="stop", policy_version=0,
        ground_truth="5", outcome={"correct": 0.0}, step_values=[0.81, 0.204, 0.1],
    )  # fmt: skip
    out = format_step_values(ro).splitlines()
    assert out[0] == "PRM step values of p1/0 (wrong, gold 5):"
    assert out[1:] == ["  V=0.810 | 3 + 4 = 7", "  V=0.204 | 7 - 2 = 4", "  V=0.100 | \\boxed{4}"]
    ro.text, ro.step_char_ends, ro.step_values = "x" * 100, [100], [0.5]
    assert format_step_values(ro, width=10).splitlines()[1] == "  V=0.500 | xxxxxxx..."


def test_verifier_metrics_split_rejected_samples_from_unscored_ones():
    """A sample with no answer was judged (rejected); a verifier timeout judged nothing (unscored)."""
    from rlloop.rewards.verifiers.base import VerifyResult

    results = [
        VerifyResult("a", 1.0, {"correct": 1.0, "format": 1.0}),
        VerifyResult("b", 0.0, {"correct": 0.0, "format": 0.0}, "no \\boxed{} answer"),
        VerifyResult("c", 0.0, {"correct": 0.0, "format": 1.0}),
        VerifyResult.failed("d", "timeout"),
    ]
    rollouts = []
    for res in results:
        ro = _rollout([1], [2])
        ro.outcome, ro.outcome_info = {"correct": res.score, **res.scores}, res.info()
        rollouts.append(ro)
    assert [ro.outcome_info.get("kind") for ro in rollouts] == [None, "rejected", None, "unscored"]
    assert verifier_metrics(rollouts) == {"verifier/unscored_frac": 0.25, "verifier/rejected_frac": 0.25}


def test_read_metrics_names_the_file_and_line_of_a_broken_row(tmp_path):
    from rlloop.errors import RlloopError

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2, "a"\n')
    with pytest.raises(RlloopError, match=r"metrics.jsonl:3: not JSON"):
        read_metrics(path)
    path.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
