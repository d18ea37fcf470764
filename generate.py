"""Sample text from a trained Mamba model.

    python generate.py --prompt "def fibonacci("                      # newest checkpoint under checkpoints/
    python generate.py --checkpoint checkpoints/run1 --temperature 0   # greedy, from a run's newest step
    python generate.py --prompt_file prompts.txt --max_new_tokens 50   # one prompt per line, as one batch
    python generate.py                                                  # on a terminal: an interactive loop
    python generate.py --checkpoint checkpoints/chat-run --chat         # a conversation (a model trained with
                                                                        # --task sft): one stdin line per turn

The prompt is read in one parallel pass that fills the recurrent state, then each new token is one O(1) step
(a CUDA graph on GPU), so time and memory per token do not grow with the context. Bad input (no checkpoint,
an option out of range, an unreadable prompt file) is reported in one line with exit code 2.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from utils import cpu_threads

cpu_threads.configure()             # before torch is imported: threads that sleep when idle, no more than the CPUs

import torch  # noqa: E402
from tqdm import tqdm

from inference import Decoder, generate_text
from inference.loading import DTYPES, UsageError, load_for_inference, resolve_device
from models.sampling import SamplingParams

DEFAULT_CHECKPOINTS = "checkpoints"
LENGTH_STEP = 256          # KV caches (models with attention layers) are allocated in steps of this many tokens


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample text from a trained Mamba model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINTS,
                   help="a folder of runs (its newest complete checkpoint is used), a run folder, a step folder, "
                        "or any HF-format Mamba folder that holds a tokenizer")
    p.add_argument("--prompt", default=None,
                   help='text to continue; "" starts from the end-of-text token. Leave out: an interactive loop '
                        "on a terminal, otherwise the prompt is read from stdin")
    p.add_argument("--prompt_file", default=None,
                   help="a UTF-8 text file with one prompt per line (blank lines skipped), run as one batch")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate at most per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    p.add_argument("--top_k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: the fewest tokens reaching this "
                                                             "probability, in (0, 1]")
    p.add_argument("--repetition_penalty", type=float, default=1.0,
                   help="> 1 makes tokens already in the prompt or output less likely (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text (default: random, "
                                                          "printed so that a run can be repeated)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end a sample when this string appears (repeatable); end-of-text always ends it")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print text as it is produced (one sample at a time); default: on when stdout is a "
                        "terminal")
    p.add_argument("--device", default="auto", help='"auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1"')
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto = bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--chat", action="store_true",
                   help="a conversation with a chat model (train.py --task sft): each stdin line is a user turn, "
                        "answered with the chat template until the end-of-turn marker; Ctrl-D ends it")
    p.add_argument("--system", default=None, help="with --chat: a system message that opens the conversation")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (the first call compiles); it traces the per-op PyTorch "
                        "step instead of the fused Triton one that runs by default on a GPU "
                        "(bench/bench_generate.py times both)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> SamplingParams:
    """Range checks the parser cannot do. Raises UsageError; returns the sampling parameters."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give --prompt or --prompt_file, not both")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.chat and (args.prompt is not None or args.prompt_file is not None or args.num_samples != 1):
        raise UsageError("--chat reads the conversation from stdin; leave out --prompt, --prompt_file, --num_samples")
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    if any(s == "" for s in args.stop):
        raise UsageError("--stop strings must not be empty")
    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty)
    except ValueError as err:
        raise UsageError(f"--{err}") from None


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts to run, or None for the interactive loop."""
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read --prompt_file {args.prompt_file!r}: {err}") from None
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--prompt_file {args.prompt_file!r} holds no prompts (one per line)")
        return prompts
    if args.prompt is not None:
        return [args.prompt]
    if sys.stdin.isatty():
        return None
    return [without_final_newline(sys.stdin.read())]


def without_final_newline(text: str) -> str:
    """A piped prompt (`echo "def f(" | python generate.py`) without the one newline the shell added at its end."""
    for end in ("\r\n", "\n"):
        if text.endswith(end):
            return text[:-len(end)]
    return text


class Session:
    """Everything needed to turn prompts into printed samples; the decoder is kept for reuse between prompts."""

    def __init__(self, model, tokenizer, args, params: SamplingParams, device: torch.device, seed: int):
        self.model, self.tokenizer, self.args, self.params = model, tokenizer, args, params
        self.rng = torch.Generator(device=device).manual_seed(seed)
        self.decoders: dict[int, Decoder] = {}

    def decoder(self, batch_size: int, length: int) -> Decoder:
        """A decoder for `batch_size` sequences of up to `length` tokens (prompt + new; the KV cache of attention
        layers is allocated for it, rounded up to LENGTH_STEP so that later prompts can reuse it)."""
        held = self.decoders.get(batch_size)
        if held is None or held.max_length < length:
            self.decoders.clear()   # one captured graph at a time: each holds its own memory pool
            max_length = -(-length // LENGTH_STEP) * LENGTH_STEP
            self.decoders[batch_size] = Decoder(self.model, batch_size, compile=self.args.compile,
                                                max_length=max_length)
        return self.decoders[batch_size]

    def run(self, prompts: list[str], out=None) -> None:
        out = sys.stdout if out is None else out
        tok, n = self.tokenizer, self.args.num_samples
        ids = [tok.encode(p) or [tok.eot_id] for p in prompts]                  # empty prompt: start a document
        batch = [p for p in ids for _ in range(n)]
        rows = [p for p in prompts for _ in range(n)]
        stream = self.args.stream and len(batch) == 1
        decoder = self.decoder(len(batch), max(map(len, batch)) + self.args.max_new_tokens)
        if stream:
            out.write(rows[0])
            out.flush()
        bar = tqdm(total=self.args.max_new_tokens, desc="generating", unit="tok", leave=False, file=sys.stderr,
                   disable=stream or not sys.stderr.isatty())

        def on_text(row: int, piece: str) -> None:
            out.write(piece)
            out.flush()

        start = time.perf_counter()
        texts, produced = generate_text(decoder, tok, batch, self.args.max_new_tokens, self.params, self.rng,
                                        self.args.stop, on_text=on_text if stream else None,
                                        on_step=lambda: bar.update(1))
        elapsed = time.perf_counter() - start
        bar.close()
        if stream:
            out.write("\n")
        else:
            for i, (prompt, text) in enumerate(zip(rows, texts)):
                if len(rows) > 1:
                    out.write(f"--- prompt {i // n + 1}" + (f", sample {i % n + 1}" if n > 1 else "") + " ---\n")
                out.write(prompt + text + "\n")
        out.flush()
        print(f"[{produced} new tokens in {elapsed:.2f} s, {produced / max(elapsed, 1e-9):.1f} tokens/s]",
              file=sys.stderr)


def chat(gen: Session, system: str | None = None) -> None:
    """A conversation: each line of stdin is a user turn; the model answers with the chat template until its
    end-of-turn marker, and the whole conversation so far is the next prompt. Ends at EOF (Ctrl-D)."""
    from utils.chat import END_TOKEN, encode_chat, has_chat_tokens
    tok, args = gen.tokenizer, gen.args
    if not has_chat_tokens(tok):
        raise UsageError("--chat: this checkpoint's tokenizer has no chat tokens; fine-tune it on conversations "
                         "first (train.py --task sft --data chat.jsonl)")
    messages = [{"role": "system", "content": system}] if system else []
    tty = sys.stdin.isatty()
    if tty:
        print("Chat: type a message and press Enter; Ctrl-D or Ctrl-C to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ") if tty else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not tty and line == "":          # end of the piped input
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids, _ = encode_chat(tok, messages, add_generation_prompt=True)

        def on_text(row: int, piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        decoder = gen.decoder(1, len(ids) + args.max_new_tokens)      # the conversation so far + the answer
        texts, _ = generate_text(decoder, tok, [ids], args.max_new_tokens, gen.params, gen.rng,
                                 [END_TOKEN, *args.stop], on_text=on_text if args.stream else None)
        sys.stdout.write("\n" if args.stream else texts[0] + "\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": texts[0]})


def interactive(gen: Session) -> None:
    print("Interactive: type a prompt and press Enter (an empty line starts from the end-of-text token); "
          "Ctrl-D or Ctrl-C to quit.", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        try:
            gen.run([prompt])
        except KeyboardInterrupt:          # stop this sample, keep the loop
            print("\n[interrupted]", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        params = check_args(args)
        device, default_dtype = resolve_device(args.device)
        dtype = default_dtype if args.dtype == "auto" else DTYPES[args.dtype]
        prompts = None if args.chat else read_prompts(args)
        model, tokenizer, ckpt = load_for_inference(args.checkpoint, device, dtype)
    except UsageError as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    if args.stream is None:
        args.stream = sys.stdout.isatty()
    seed = args.seed if args.seed is not None else random.randrange(2 ** 31)
    print(f"[{ckpt}: {model.num_parameters() / 1e6:.1f}M parameters on {device}, {str(dtype).split('.')[-1]}; "
          f"seed {seed}]", file=sys.stderr)
    gen = Session(model, tokenizer, args, params, device, seed)
    try:
        if args.chat:
            chat(gen, args.system)
        elif prompts is None:
            interactive(gen)
        else:
            gen.run(prompts)
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    except UsageError as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
