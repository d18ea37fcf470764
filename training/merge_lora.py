"""Fold a LoRA adapter into its base and write a plain HF-format checkpoint (MambaForCausalLM opens it).

    python -m training.merge_lora checkpoints/run/step_000200 merged/          # the base named in the adapter
    python -m training.merge_lora path/to/adapter merged/ --base path/to/base   # or another copy of the base

The adapter may be one of our LoRA checkpoints (a run, or a step folder) or any PEFT LoRA folder for a Mamba-1
model. The output holds config.json, model.safetensors and the tokenizer. Bad input: one line, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models import lora

from .checkpoint import find_latest_checkpoint
from .config import ConfigError
from .finetune import load_lora_checkpoint


def merge_to(adapter: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Write the merged model of `adapter` (a checkpoint path as generate.py takes it) into `out`."""
    found = find_latest_checkpoint(adapter)
    if found is None or not lora.is_adapter_dir(found):
        raise ConfigError(f"{str(adapter)!r} holds no LoRA adapter (adapter_config.json)")
    model, tokenizer = load_lora_checkpoint(found, base=base, merge=True)
    out = Path(out)
    model.save_pretrained(out, eos_token_id=tokenizer.eot_id)
    tokenizer.save(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Merge a LoRA adapter into its base and save a plain HF checkpoint.")
    p.add_argument("adapter", help="a LoRA checkpoint (run or step folder) or a PEFT adapter folder")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--base", default=None, help="the base model folder (default: the one the adapter names)")
    args = p.parse_args(argv)
    try:
        out = merge_to(args.adapter, args.out, args.base)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged model written to {out} (config.json, model.safetensors, tokenizer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
