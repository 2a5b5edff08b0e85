"""`python -m rlloop.export CHECKPOINT OUT_DIR`: write a HF folder from an rlloop checkpoint.

CHECKPOINT is a `<run>/checkpoints/step_N` folder (or a run dir: its newest complete checkpoint).
The DeepSpeed ZeRO-2/3 shards of every rank are merged into full fp32 weights, so the result loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` on any machine; `--dtype bfloat16` writes them in bf16
(half the size; what vLLM and most serving stacks load). A LoRA run (learner.lora) exports its
adapter as a peft folder (`PeftModel.from_pretrained(base, OUT_DIR)`); with `--merged`, the model with the
adapter merged in, and the adapter in OUT_DIR/adapter.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from rlloop import checkpoint
from rlloop.errors import RlloopError, exit_on_user_error

logger = logging.getLogger("rlloop.export")


DTYPES = ("float32", "bfloat16")  # --dtype: the weights' type in OUT_DIR (training keeps fp32 masters)


def export(ckpt: str | Path, out_dir: str | Path, *, merged: bool = False, dtype: str = "float32") -> Path:
    """Write OUT_DIR from checkpoint `ckpt` with weights of `dtype` (one of DTYPES; a LoRA adapter stays
    fp32); `merged` applies to LoRA runs only (see the module doc)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise RlloopError(f"--dtype {dtype}: choose from {', '.join(DTYPES)}")
    ckpt = Path(ckpt)
    if not (ckpt / checkpoint.STATE_FILE).is_file():
        found = checkpoint.list_complete(ckpt / "checkpoints") or checkpoint.list_complete(ckpt)
        if not found:
            raise RlloopError(
                f"{ckpt}: no complete rlloop checkpoint (a step_N folder with {checkpoint.STATE_FILE})"
            )
        ckpt = found[-1]
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "learner"), tag="state")
    config = AutoConfig.from_pretrained(ckpt / "hf")
    from rlloop.learner.lora import ADAPTER_CONFIG

    if (ckpt / "learner" / ADAPTER_CONFIG).is_file():
        return _export_lora(ckpt, state, config, Path(out_dir), merged, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {
        k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")
    }
    if unexpected or set(missing) - tied:
        raise RlloopError(
            f"{ckpt}: weights do not match the saved config (missing {missing}, unexpected {unexpected})"
        )
    if tied:
        model.tie_weights()
    model.to(getattr(torch, dtype))  # the saved config.json records it (`dtype`)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(ckpt / "hf").save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    logger.info("exported %s -> %s", ckpt, out_dir)
    return out_dir


def _export_lora(ckpt: Path, state: dict, config, out_dir: Path, merged: bool, dtype: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlloop.learner.lora import (
        apply_lora,
        lora_from_adapter_config,
        merge_adapter,
        model_from_state,
        save_adapter,
    )

    lora = lora_from_adapter_config(str(ckpt / "learner"))
    model = model_from_state(
        lambda: AutoModelForCausalLM.from_config(config, dtype=torch.float32),
        lambda base: apply_lora(base, lora),
        state,
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, str(tmp / "adapter" if merged else tmp))
    if merged:
        merge_adapter(model).to(getattr(torch, dtype)).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(ckpt / "hf").save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    logger.info("exported %s -> %s (%s)", ckpt, out_dir, "merged model + adapter/" if merged else "LoRA adapter")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlloop.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint", help="a checkpoints/step_N folder, or a run dir (its newest checkpoint)"
    )
    parser.add_argument("out_dir", help="where to write the HF folder")
    parser.add_argument(
        "--merged", action="store_true", help="LoRA runs: the model with the adapter merged in (+ adapter/)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="the weights' type in OUT_DIR (default float32)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error(logger):
        print(export(args.checkpoint, args.out_dir, merged=args.merged, dtype=args.dtype))


if __name__ == "__main__":
    main()
