"""Decoding speed: the default step against the paths it replaced, flat per-token cost, and HF transformers.

    python bench/bench_generate.py --parts variants,kernels --out $OUT/gen.json   # GPU, ~1.5 min: every step path
    python bench/bench_generate.py --parts sweep --out $OUT/sweep.json           # GPU, ~1 min: the block step's knobs
    python bench/bench_generate.py                       # GPU: medium shape (768 x 24, vocab 50280), bf16, all parts
    python bench/bench_generate.py --quick --device cpu  # a tiny shape, to check the script runs

Every figure uses the same random weights and the same prompt (greedy, no end-of-text stop):
  * ms/token at batch 1 and tokens/s at batch 64, after a 128-token prompt, for each way of running the step:
    eager / CUDA graph / torch.compile + CUDA graph, and the path of each block's step (STEP_PATHS, all in
    kernels/decode_step.py): "block" (two Triton kernels and out_proj per layer), "mixer" (the default on CUDA: the
    add+RMSNorm kernel, in_proj, two Triton kernels, out_proj), "triton" (the previous default: one kernel per op,
    the Triton conv step and state update) or "torch" (the same with the PyTorch state update).
    "decode" times only the per-token loop (sample + step), "end to end" adds the prefill, as mamba_ssm's figure in
    ../shared/ANCHORS.md does (prompt 128, 256 new tokens).
  * kernels per step: CUDA kernels one eager step launches at batch 1, for each step path (what a CUDA graph
    replays: at batch 1 the per-token time is about their count times a few microseconds).
  * per-token latency and peak memory of the decode loop after prompts of 1k and 16k tokens (must be flat).
  * HF transformers' MambaForCausalLM.generate on the same weights (converted with save_pretrained): per-token time,
    and whether its greedy tokens equal ours (fp32 must match exactly; bf16 rounds differently, so the number of
    equal leading tokens is reported).
Results go to --out as JSON and a table is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models.layers.mamba1 as mamba_module  # noqa: E402
from inference import Decoder  # noqa: E402
from kernels import state_update  # noqa: E402
from models import MambaConfig, LanguageModel  # noqa: E402
from models.sampling import SamplingParams, sample  # noqa: E402

GREEDY = SamplingParams(temperature=0)
ANCHOR_MS = 0.84            # mamba_ssm, cg=True, batch 1, prompt 128, 256 new tokens, same H100 (ANCHORS.md)


# step path -> (KernelChoice.step, selective_state_update backend of the per-op step)
STEP_PATHS = {"block": ("triton_block", "auto"), "mixer": ("triton", "auto"), "triton": ("torch", "triton"),
              "torch": ("torch", "torch")}
DEFAULT_PATH = ("graph", "mixer")          # what Decoder and generate.py run on CUDA
PREVIOUS_PATH = ("graph", "triton")        # the default before kernels/triton_decode_step.py


def use_step_path(model, device, path: str, default) -> None:
    """Route the model's decoding step to one path (STEP_PATHS), on the same weights; path None: back to `default`
    (the model's own ModelKernels) and the automatic state update."""
    step, state_update_backend = STEP_PATHS[path] if path else (default.mamba1.step, "auto")
    model.use_kernels(device, dataclasses.replace(default, mamba1=dataclasses.replace(default.mamba1, step=step)))
    # the per-op step always asks for "auto"; a benchmark pins its backend here
    mamba_module.selective_state_update = functools.partial(state_update.selective_state_update,
                                                            backend=state_update_backend)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_loop(decoder: Decoder, ids: torch.Tensor, n_new: int) -> float:
    """Seconds per decode step (greedy sample + one step) after a prefill of `ids`."""
    vocab = decoder.model.config.vocab_size
    logits = decoder.prefill(ids)
    sync(decoder.device)
    start = time.perf_counter()
    for _ in range(n_new):
        logits = decoder.step(sample(logits, GREEDY, vocab))
    sync(decoder.device)
    return (time.perf_counter() - start) / n_new


def end_to_end(decoder: Decoder, ids: torch.Tensor, n_new: int) -> tuple[float, torch.Tensor]:
    """Seconds per new token for prefill + n_new tokens through Decoder.generate, and the tokens."""
    sync(decoder.device)
    start = time.perf_counter()
    out = decoder.decode(ids, n_new, GREEDY)
    sync(decoder.device)
    return (time.perf_counter() - start) / n_new, out


def median_of(fn, repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


VARIANTS = {   # part -> (name, step path, CUDA graph, torch.compile)
    "variants": [("eager", "torch", False, False), ("eager", "triton", False, False), ("eager", "block", False, False),
                 ("graph", "torch", True, False), ("graph", "triton", True, False), ("graph", "mixer", True, False),
                 ("graph", "block", True, False)],
    # under torch.compile the PyTorch step is traced whatever the path, and inductor fuses it
    "compile": [("compile+graph", "block", True, True)],
}


def bench_variants(model, args, device, results, part="variants"):
    """ms/token (batch 1) and tokens/s (batch 64) for each step variant of `part`."""
    vocab = model.config.vocab_size
    variants = VARIANTS[part]
    if device.type != "cuda":
        variants = [v for v in variants if not v[2] and v[1] == "torch"]
    reference = results.setdefault("_reference", {})
    default = model.kernels_for(device)
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, vocab, (batch, args.prompt_len), generator=g).to(device)
        for name, path, graph, compile in variants:
            key = f"{name}/{path}/b{batch}"
            use_step_path(model, device, path, default)
            n_new = args.new_tokens if name != "eager" else max(16, args.new_tokens // 4)
            t0 = time.perf_counter()
            try:
                decoder = Decoder(model, batch, cuda_graph=graph, compile=compile)
                decoder.decode(ids, 4, GREEDY)                     # warm-up (and compile)
            except Exception as err:   # a variant that cannot run is reported, the others still are
                results["variants"][key] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                print(f"{key}: FAILED {results['variants'][key]['error']}", flush=True)
                continue
            setup_s = time.perf_counter() - t0
            step_s = median_of(lambda: decode_loop(decoder, ids, n_new), args.repeat)
            e2e_s, out = end_to_end(decoder, ids, n_new)
            e2e_s = statistics.median([e2e_s] + [end_to_end(decoder, ids, n_new)[0] for _ in range(args.repeat - 1)])
            same = None
            if batch in reference:
                n = min(reference[batch].shape[1], out.shape[1])
                equal = (reference[batch][:, args.prompt_len:n] == out[:, args.prompt_len:n]).all(0).cpu()
                same = int(equal.long().cumprod(0).sum())       # leading new tokens equal in every row
            else:
                reference[batch] = out
                same = out.shape[1] - args.prompt_len
            results["variants"][key] = dict(batch=batch, ms_per_token=step_s * 1e3, tokens_per_s=batch / step_s,
                                            e2e_ms_per_token=e2e_s * 1e3, setup_s=setup_s, new_tokens=n_new,
                                            equal_leading_tokens=same)
            Path(args.out).write_text(json.dumps({k: v for k, v in results.items() if k != "_reference"}, indent=2))
            print(f"{key}: {step_s * 1e3:.3f} ms/step, {batch / step_s:,.0f} tok/s, e2e {e2e_s * 1e3:.3f} ms/token, "
                  f"setup {setup_s:.1f} s, leading tokens equal to the first variant's: {same}/{n_new}", flush=True)
            del decoder
            if device.type == "cuda":
                torch.cuda.empty_cache()
    use_step_path(model, device, None, default)


@torch.no_grad()
def bench_kernels(model, args, device, results):
    """CUDA kernels launched by one eager decoding step at batch 1, per step path (what one graph replay runs)."""
    if device.type != "cuda":
        print("kernels: needs CUDA, skipped", flush=True)
        return
    from torch.profiler import ProfilerActivity, profile

    default = model.kernels_for(device)
    for path in STEP_PATHS:
        use_step_path(model, device, path, default)
        cache = model.init_cache(1)
        tokens = torch.zeros(1, dtype=torch.long, device=device)
        for _ in range(3):
            model.step_states(tokens, *cache.step_args())              # warm-up: Triton compiles, cuBLAS picks
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.step_states(tokens, *cache.step_args())
            sync(device)
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        per_name = {}
        for n in names:
            per_name[n[:60]] = per_name.get(n[:60], 0) + 1
        results["kernels"][path] = dict(per_step=len(names), per_layer=len(names) / model.config.n_layer,
                                        by_name=dict(sorted(per_name.items(), key=lambda kv: -kv[1])))
        print(f"kernels per step, {path}: {len(names)} ({len(names) / model.config.n_layer:.1f} per layer)",
              flush=True)
    use_step_path(model, device, None, default)


SWEEP = [  # kernels/triton_decode_step.py constants: the default first
    dict(BLOCK_CHANNELS=16, BLOCK_MODEL=128, BLOCK_WARPS=8, BLOCK_STAGES=2, STATE_TILE=1024),
    dict(BLOCK_CHANNELS=16, BLOCK_MODEL=64, BLOCK_WARPS=4, BLOCK_STAGES=2, STATE_TILE=1024),
    dict(BLOCK_CHANNELS=16, BLOCK_MODEL=256, BLOCK_WARPS=8, BLOCK_STAGES=2, STATE_TILE=1024),
    dict(BLOCK_CHANNELS=16, BLOCK_MODEL=128, BLOCK_WARPS=8, BLOCK_STAGES=1, STATE_TILE=1024),
    dict(BLOCK_CHANNELS=32, BLOCK_MODEL=128, BLOCK_WARPS=8, BLOCK_STAGES=2, STATE_TILE=1024),
    dict(BLOCK_CHANNELS=16, BLOCK_MODEL=128, BLOCK_WARPS=8, BLOCK_STAGES=2, STATE_TILE=512),
    dict(BLOCK_CHANNELS=16, BLOCK_MODEL=128, BLOCK_WARPS=8, BLOCK_STAGES=2, STATE_TILE=2048),
]


def bench_sweep(model, args, device, results):
    """The block step's block sizes (kernels/triton_decode_step.py constants): ms/token of the CUDA-graph step at
    batch 1 for each, to set them from."""
    if device.type != "cuda":
        print("sweep: needs CUDA, skipped", flush=True)
        return
    from kernels import triton_decode_step as tds

    default = model.kernels_for(device)
    use_step_path(model, device, "block", default)
    saved = {name: getattr(tds, name) for name in SWEEP[0]}
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    for knobs in SWEEP:
        for name, value in knobs.items():
            setattr(tds, name, value)
        decoder = Decoder(model, 1)
        decoder.decode(ids, 4, GREEDY)                                 # warm-up (compiles this variant)
        step_s = median_of(lambda: decode_loop(decoder, ids, args.new_tokens), args.repeat)
        label = ", ".join(f"{k}={v}" for k, v in knobs.items())
        results["sweep"].append(dict(knobs, ms_per_token=step_s * 1e3))
        print(f"sweep {label}: {step_s * 1e3:.3f} ms/step", flush=True)
        del decoder
    for name, value in saved.items():
        setattr(tds, name, value)
    use_step_path(model, device, None, default)


def bench_context(model, args, device, results):
    """Per-token latency and decode-loop peak memory after long prompts: both must not grow with the context."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    decoder = Decoder(model, 1, cuda_graph=device.type == "cuda")
    for context in args.contexts:
        ids = torch.randint(0, vocab, (1, context), generator=g).to(device)
        decode_loop(decoder, ids, 8)                               # warm-up at this length
        extra = None
        if device.type == "cuda":
            logits = decoder.prefill(ids)
            sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(64):
                logits = decoder.step(sample(logits, GREEDY, vocab))
            sync(device)
            extra = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        step_s = median_of(lambda: decode_loop(decoder, ids, args.new_tokens), args.repeat)
        results["context"][str(context)] = dict(ms_per_token=step_s * 1e3, decode_peak_extra_mib=extra)
        print(f"context {context}: {step_s * 1e3:.3f} ms/token, decode-loop memory above the cache: {extra} MiB",
              flush=True)


def bench_hf(model, args, device, results):
    """transformers' MambaForCausalLM on the same weights: time per token and greedy agreement with ours."""
    from transformers import MambaForCausalLM

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(2)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        model.float().save_pretrained(tmp)
        for dtype_name, dtype, n_new in (("fp32", torch.float32, args.hf_check_tokens),
                                         ("bf16", torch.bfloat16, args.hf_tokens)):
            ours_model = model.to(dtype)
            hf = MambaForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
            hf.generation_config.eos_token_id = None               # never stop early: compare full lengths
            hf.generation_config.pad_token_id = 0

            def hf_generate(n):
                sync(device)
                start = time.perf_counter()
                with torch.no_grad():
                    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
                sync(device)
                return time.perf_counter() - start, out

            hf_generate(2)                                          # warm-up
            t_one, _ = hf_generate(1)
            t_n, hf_out = hf_generate(n_new)
            hf_ms = (t_n - t_one) / (n_new - 1) * 1e3                # decode steps only, prefill cancels out
            decoder = Decoder(ours_model, 1)
            ours_out = decoder.decode(ids, n_new, GREEDY)
            ours_ms = median_of(lambda: decode_loop(decoder, ids, n_new), args.repeat) * 1e3
            new_hf, new_ours = hf_out[0, ids.shape[1]:].cpu(), ours_out[0, ids.shape[1]:].cpu()
            equal = new_hf == new_ours
            prefix = int(equal.long().cumprod(0).sum())
            results["hf"][dtype_name] = dict(hf_ms_per_token=hf_ms, ours_ms_per_token=ours_ms, new_tokens=n_new,
                                             identical=bool(equal.all()), equal_leading_tokens=prefix,
                                             speedup=hf_ms / ours_ms)
            print(f"HF {dtype_name}: {hf_ms:.2f} ms/token vs ours {ours_ms:.3f} ({hf_ms / ours_ms:.1f}x); greedy "
                  f"tokens identical: {bool(equal.all())} ({prefix}/{n_new} leading equal)", flush=True)
            del hf, decoder
    model.to(args.dtype_t)


def table(results) -> str:
    rows = ["| step | path | batch | ms/token (decode) | tokens/s | end to end ms/token | equal leading tokens |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in results["variants"].items():
        name, path, b = key.split("/")
        if "error" in r:
            rows.append(f"| {name} | {path} | {b[1:]} | failed: {r['error'][:80]} | | | |")
            continue
        default = " (default)" if (name, path) == DEFAULT_PATH else ""
        rows.append(f"| {name}{default} | {path} | {r['batch']} | {r['ms_per_token']:.3f} | {r['tokens_per_s']:,.0f} "
                    f"| {r['e2e_ms_per_token']:.3f} | {r['equal_leading_tokens']}/{r['new_tokens']} |")
    if results["sweep"]:
        names = list(SWEEP[0])
        rows += ["", "| " + " | ".join(names) + " | ms/token (batch 1, CUDA graph) |",
                 "| " + " | ".join("---" for _ in names) + " | --- |"]
        for r in results["sweep"]:
            rows.append("| " + " | ".join(str(r[n]) for n in names) + f" | {r['ms_per_token']:.3f} |")
    if results["kernels"]:
        rows += ["", "| step path | CUDA kernels per step (batch 1) | per layer |", "| --- | --- | --- |"]
        for path, r in results["kernels"].items():
            rows.append(f"| {path} | {r['per_step']} | {r['per_layer']:.1f} |")
    rows += ["", "| context | ms/token | decode-loop memory above the cache (MiB) |", "| --- | --- | --- |"]
    for c, r in results["context"].items():
        mem = "-" if r["decode_peak_extra_mib"] is None else f"{r['decode_peak_extra_mib']:.1f}"
        rows.append(f"| {c} | {r['ms_per_token']:.3f} | {mem} |")
    rows += ["", "| weights | HF MambaForCausalLM ms/token | ours ms/token | ratio | greedy identical |",
             "| --- | --- | --- | --- | --- |"]
    for d, r in results["hf"].items():
        rows.append(f"| {d} | {r['hf_ms_per_token']:.2f} | {r['ours_ms_per_token']:.3f} | {r['speedup']:.1f}x | "
                    f"{r['identical']} ({r['equal_leading_tokens']}/{r['new_tokens']}) |")
    return "\n".join(rows)


def default_summary(results) -> str:
    """The default path's figures at each batch, against the previous default (CUDA graph, per-op Triton step)
    and mamba_ssm's anchor."""
    lines = []
    for key, r in results["variants"].items():
        name, path, b = key.split("/")
        if (name, path) != DEFAULT_PATH or "error" in r:
            continue
        line = (f"default path (CUDA graph, block step), batch {r['batch']}: {r['ms_per_token']:.3f} ms/step, "
                f"{r['e2e_ms_per_token']:.3f} ms/token end to end, {r['tokens_per_s']:,.0f} tokens/s")
        old = results["variants"].get("/".join(PREVIOUS_PATH) + f"/{b}", {})
        if "ms_per_token" in old:
            line += (f"; previous default {old['ms_per_token']:.3f} ms/step, {old['e2e_ms_per_token']:.3f} end to "
                     f"end ({old['ms_per_token'] / r['ms_per_token']:.2f}x)")
        if r["batch"] == 1:
            line += f"; mamba_ssm with CUDA graphs {ANCHOR_MS} ms/token ({ANCHOR_MS / r['e2e_ms_per_token']:.2f}x)"
        lines.append(line)
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quick", action="store_true", help="a tiny model and few tokens (checks the script)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--parts", default="variants,kernels,context,hf,compile",
                   help="comma-separated parts to run, in this order: variants (eager and CUDA graph, every step "
                        "path), kernels (CUDA kernels per step), sweep (the block step's block sizes, not by "
                        "default), context, hf, compile (torch.compile + CUDA graph: slow to compile, so last)")
    p.add_argument("--out", default="bench_generate.json")
    args = p.parse_args()
    device = torch.device(args.device)
    args.dtype_t = getattr(torch, args.dtype)
    if args.quick:
        shape = dict(d_model=64, n_layer=2, vocab_size=1000)
        args.batches, args.contexts, args.prompt_len, args.new_tokens = [1, 4], [64, 512], 16, 16
        args.hf_tokens, args.hf_check_tokens = 8, 8
    else:
        shape = dict(d_model=768, n_layer=24, vocab_size=50277)         # mamba-130m: padded vocab 50280
        args.batches, args.contexts, args.prompt_len, args.new_tokens = [1, 64], [1024, 16384], 128, 256
        args.hf_tokens, args.hf_check_tokens = 64, 32
    torch.manual_seed(0)
    model = LanguageModel(MambaConfig(**shape)).to(device=device, dtype=args.dtype_t).eval()
    with torch.no_grad():
        # the released init leaves logits nearly uniform; spread them so greedy comparisons are not decided by ties
        model.backbone.embeddings.weight.normal_(0, 1.0)
    results = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__, shape=shape, dtype=args.dtype, prompt_len=args.prompt_len,
                   variants={}, kernels={}, sweep=[], context={}, hf={})
    print(f"{results['device']}, torch {torch.__version__}, {shape}, {args.dtype}", flush=True)
    parts = dict(variants=bench_variants, compile=functools.partial(bench_variants, part="compile"),
                 kernels=bench_kernels, sweep=bench_sweep, context=bench_context, hf=bench_hf)
    for part in filter(None, args.parts.split(",")):
        if part not in parts:
            p.error(f"--parts: unknown part {part!r}; allowed: {', '.join(parts)}")
        t0 = time.perf_counter()
        parts[part](model, args, device, results)
        print(f"[{part}: {time.perf_counter() - t0:.0f} s]", flush=True)
        Path(args.out).write_text(json.dumps({k: v for k, v in results.items() if k != "_reference"}, indent=2))
    print(table(results))
    summary = default_summary(results)
    if summary:
        print("\n" + summary)

if __name__ == "__main__":
    main()
