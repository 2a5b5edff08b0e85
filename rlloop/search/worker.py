"""The rollout worker, extended with what search needs: whole solutions as `Candidate`s and single steps.

`SearchWorkerCore` is a `RolloutWorkerCore` (same engine, tokenizer and step rules) with two more methods:
`sample` (Best-of-N: `generate`, returned as candidates) and `generate_steps` (beam search: sample until
the end of the next reasoning step). `SearchWorker` is its Ray actor, built on first access.

Stopping at a step: a stopping criterion decodes each row's new tokens and ends the row as soon as its
text holds a step delimiter after some visible text (or a regex match, with `step_regex`). The kept step
ends with the delimiter; when the token that completed the delimiter also carries the next step's first
characters (a BPE merge such as ".\\n\\nThe"), those characters are dropped and the kept text is re-encoded,
so the next depth continues from exactly the text the PRM scored.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Optional, Sequence

from rlloop.distributed.actor import lazy_actors
from rlloop.rollout.worker import RolloutWorkerCore
from rlloop.search.beam import StepOutput, StepRequest
from rlloop.search.bon import Candidate

logger = logging.getLogger(__name__)


def first_step_end(text: str, delimiter: str = "\n\n", regex: Optional[str] = None) -> Optional[int]:
    """End (exclusive, delimiter included) of the first separator in `text` that follows visible text.

    A separator before any visible character (a step that starts with blank lines) does not end a step.
    None when no step has ended yet.
    """
    if regex is not None:
        matches = ((m.start(), m.end()) for m in re.finditer(regex, text) if m.end() > m.start())
    else:
        if not delimiter:
            raise ValueError("first_step_end: delimiter must be a non-empty string (or pass regex=...)")
        matches = ((m.start(), m.end()) for m in re.finditer(re.escape(delimiter), text))
    for start, end in matches:
        if text[:start].strip():
            return end
    return None


def _step_stopping_criterion(tokenizer, width: int, delimiter: str, regex: Optional[str]):
    import torch
    from transformers import StoppingCriteria

    class StepStop(StoppingCriteria):
        """Ends a row once its new text holds a finished step; records how many tokens that took."""

        def __init__(self):
            self.stopped_at: dict[int, int] = {}

        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, width:]
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for r in range(input_ids.shape[0]):
                if r in self.stopped_at:
                    done[r] = True
                    continue
                text = tokenizer.decode(new[r].tolist(), skip_special_tokens=True)
                if first_step_end(text, delimiter, regex) is not None:
                    self.stopped_at[r] = new.shape[1]
                    done[r] = True
            return done

    return StepStop()


class SearchWorkerCore(RolloutWorkerCore):
    """A rollout worker that also returns search candidates and samples one reasoning step at a time."""

    def sample(self, prompts: list[dict], n: int, **sampling: Any) -> list[list[Candidate]]:
        """`n` whole solutions per prompt, as `Candidate`s indexed `[prompt][sample]`. `sampling`:
        `generate`'s keywords (max_new_tokens, temperature, top_p, seed), passed through unchanged so the
        two cannot drift apart."""
        rollouts = self.generate(prompts, n=n, **sampling)
        out = []
        for k in range(len(prompts)):
            out.append(
                [
                    Candidate(
                        text=r.text,
                        step_char_ends=list(r.step_char_ends),
                        num_tokens=len(r.response_ids),
                        finish_reason=r.finish_reason,
                    )
                    for r in rollouts[k * n : (k + 1) * n]
                ]
            )
        return out

    def generate_steps(
        self,
        requests: Sequence[StepRequest],
        n: int,
        *,
        max_step_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: Optional[int] = None,
    ) -> list[list[StepOutput]]:
        """`n` sampled next steps per request, indexed `[request][sample]`."""
        import torch

        if n < 1 or max_step_tokens < 1:
            raise ValueError(
                f"generate_steps: need n >= 1 and max_step_tokens >= 1, got {n}, {max_step_tokens}"
            )
        if seed is not None:
            torch.manual_seed(seed)
        t0 = time.perf_counter()
        rows = []
        for q, req in enumerate(requests):
            if "prompt_ids" not in req.prompt:
                raise KeyError(
                    f"generate_steps: request {q} (uid {req.prompt.get('uid')!r}) has no 'prompt_ids'"
                )
            ids = [int(t) for t in req.prompt["prompt_ids"]] + [int(t) for t in req.response_ids]
            rows.extend((q, j, ids) for j in range(n))
        rows.sort(key=lambda r: len(r[2]))  # similar lengths per batch: little padding
        out: list[list[Optional[StepOutput]]] = [[None] * n for _ in requests]
        size = self.engine.max_batch_size
        for b in range(0, len(rows), size):
            chunk = rows[b : b + size]
            results = self._step_batch([r[2] for r in chunk], max_step_tokens, temperature, top_p)
            for (q, j, _), (text, new_ids, num_tokens, reason) in zip(chunk, results, strict=True):
                out[q][j] = StepOutput(text, list(requests[q].response_ids) + new_ids, num_tokens, reason)
        total = sum(o.num_tokens for outs in out for o in outs)  # type: ignore[union-attr]
        logger.debug("generated %d steps, %d tokens in %.2fs", len(rows), total, time.perf_counter() - t0)
        return out  # type: ignore[return-value]

    def _step_batch(self, inputs: list[list[int]], max_step_tokens: int, temperature: float, top_p: float):
        """[(step text, kept new ids, tokens generated, finish reason)] per input row."""
        from transformers import StoppingCriteriaList

        width = max(len(p) for p in inputs)  # generate_padded's: every input ends at this column
        stop = _step_stopping_criterion(self.tokenizer, width, self.step_delimiter, self.step_regex)
        sampling = None if temperature <= 0 else {"temperature": temperature, "top_k": 0, "top_p": top_p}
        sequences, _ = self.engine.generate_padded(
            inputs,
            max_new_tokens=max_step_tokens,
            sampling=sampling,
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        new_tokens = sequences[:, width:].cpu().tolist()
        eos = set(self.engine.eos_token_ids)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        outputs = []
        for r, tokens in enumerate(new_tokens):
            if r in stop.stopped_at:
                ids = tokens[: stop.stopped_at[r]]
                full = decode(ids)
                end = first_step_end(full, self.step_delimiter, self.step_regex)
                text = full[:end]
                if text != full:  # the last token ran past the delimiter: keep only the step's text
                    ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                outputs.append((text, ids, stop.stopped_at[r], "step"))
                continue
            e = next((t for t, tok in enumerate(tokens) if tok in eos), None)
            if e is not None:
                outputs.append((decode(tokens[:e]), tokens[: e + 1], e + 1, "stop"))
            else:
                outputs.append((decode(tokens), tokens, len(tokens), "length"))
        return outputs


__getattr__ = lazy_actors(__name__, SearchWorker=SearchWorkerCore)
