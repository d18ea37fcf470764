"""Write a transformer checkpoint (pattern of T layers) as an HF Llama folder that LlamaForCausalLM opens.

    python -m training.export_llama checkpoints/<run> llama_out/       # the run's newest checkpoint
    python -m training.export_llama checkpoints/<run>/step_000200 out/  # one step; a LoRA one is merged first

The output holds config.json, model.safetensors (vocabulary cut to the tokenizer's size) and the tokenizer
(tokenizer.json + tokenizer_config.json, which AutoTokenizer reads). Bad input: one line, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.formats.llama import save_llama

from .checkpoint import find_latest_checkpoint, load_model_and_tokenizer


def export_to(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the model of `checkpoint` (any path generate.py takes) into `out` as a Llama folder."""
    found = find_latest_checkpoint(checkpoint, for_inference=True)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {str(checkpoint)!r}")
    model, tokenizer, _ = load_model_and_tokenizer(found, verified=True)
    out = Path(out)
    save_llama(model, out, eos_token_id=tokenizer.eot_id)
    tokenizer.save(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a transformer checkpoint as an HF Llama folder.")
    p.add_argument("checkpoint", help="a run, a step folder, or a model folder (a LoRA checkpoint is merged)")
    p.add_argument("out", help="the folder to write")
    args = p.parse_args(argv)
    try:
        out = export_to(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Llama checkpoint written to {out} (config.json, model.safetensors, tokenizer): "
          f"transformers.LlamaForCausalLM.from_pretrained opens it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
