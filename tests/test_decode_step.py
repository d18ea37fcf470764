"""The fused decoding steps of a Mamba-1 block (kernels/triton_decode_step.py) against their reference: y, the new
residual and both states over several steps at awkward shapes; and the model's decoding with them against the full
forward's logits.

As in tests/test_triton_scan.py: the tests marked `interp` run in a TRITON_INTERPRET=1 subprocess started by
test_interpreter_suite; the `gpu` tests run on CUDA at mamba-130m's shape and are skipped without a GPU.
"""
import dataclasses
import os

import pytest
import torch

from helpers import randomize_parameters, run_interpreter_suite
from kernels.decode_step import block_step, mixer_step
from models import MambaConfig, LanguageModel
from models.layers.base import ModelKernels

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="runs inside test_interpreter_suite (TRITON_INTERPRET=1)")
release = pytest.mark.triton_release     # an interp_ case .ci/run runs on the other Triton releases too

FP32_TOL = 1e-5     # max |out - ref| / max |ref| in fp32
# bf16: the fused steps keep dt, B, C and delta in fp32 where the reference rounds them to bf16 between its kernels,
# so both are measured against the exact (fp32) result on the same bf16 inputs: the fused error must be within
# BF16_TOL or within BF16_SLACK times the bf16 reference's own. (Triton 3.6's interpreter rounds fp32 -> bf16 toward
# zero, which doubles the error of each rounding the kernels make; a GPU rounds to nearest.)
BF16_TOL, BF16_SLACK = 3e-2, 2.0


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def make_step_inputs(batch, d_model, d_in, dstate, dt_rank, width, dtype, device, seed=0, conv_bias=True,
                     dt_bias=True):
    """Weights laid out as the model holds them (the conv weight a (d_in, k) view of (d_in, 1, k)), and states."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device, dtype)

    weights = dict(
        norm_weight=rand(d_model, scale=0.3, shift=1.0), eps=1e-5, in_proj_weight=rand(2 * d_in, d_model,
                                                                                       scale=d_model ** -0.5),
        conv_weight=rand(d_in, 1, width, scale=0.5)[:, 0, :], conv_bias=rand(d_in) if conv_bias else None,
        x_proj_weight=rand(dt_rank + 2 * dstate, d_in, scale=d_in ** -0.5),
        dt_proj_weight=rand(d_in, dt_rank, scale=dt_rank ** -0.5),
        dt_proj_bias=rand(d_in, scale=0.5, shift=-1.0) if dt_bias else None,
        A_log=rand(d_in, dstate, scale=0.5), D=rand(d_in, shift=1.0))
    states = (rand(batch, d_in, width), torch.randn(batch, d_in, dstate, generator=g).to(device))
    return weights, states, g


def run_step(kind, inputs, states, weights, backend):
    """One step of `kind` ("mixer" or "block"): returns its outputs (y, and the new residual for "block")."""
    conv_state, ssm_state = states
    if kind == "mixer":
        mixer_weights = {k: v for k, v in weights.items() if k not in ("norm_weight", "eps", "in_proj_weight")}
        return (mixer_step(inputs["xz"], conv_state, ssm_state, **mixer_weights, backend=backend),)
    return block_step(inputs["h"], inputs["residual"], conv_state=conv_state, ssm_state=ssm_state, **weights,
                      backend=backend)


def check_step(kind, batch, d_model, d_in, dstate, dt_rank, width, dtype, device, steps=3, first_layer=False,
               **flags):
    """Several fused steps track the reference's outputs and both states. The activations are views of wider rows
    (the kernels read them through their strides)."""
    weights, states, g = make_step_inputs(batch, d_model, d_in, dstate, dt_rank, width, dtype, device, **flags)
    chains = {"fused": [t.clone() for t in states], "ref": [t.clone() for t in states],
              "exact": [t.float() for t in states]}
    exact_weights = {k: v.float() if torch.is_tensor(v) else v for k, v in weights.items()}
    for _ in range(steps):
        xz = torch.randn(batch, 2 * d_in + 3, generator=g).to(device, dtype)[:, 1:2 * d_in + 1]
        h = torch.randn(batch, d_model + 2, generator=g).to(device, dtype)[:, :d_model]
        residual = None if first_layer else torch.randn(batch, d_model, generator=g).to(device)
        inputs = dict(xz=xz, h=h, residual=residual)
        fused = run_step(kind, inputs, chains["fused"], weights, "triton")
        ref = run_step(kind, inputs, chains["ref"], weights, "torch")
        exact = run_step(kind, {k: v if v is None else v.float() for k, v in inputs.items()}, chains["exact"],
                         exact_weights, "torch")
        assert fused[0].dtype == dtype and fused[0].shape == (batch, d_in)
        pairs = list(zip(fused, ref, exact)) + list(zip(chains["fused"], chains["ref"], chains["exact"]))
        for i, (out, out_ref, out_exact) in enumerate(pairs):
            if dtype == torch.float32:
                assert rel_err(out, out_ref) < FP32_TOL, f"output {i}: {rel_err(out, out_ref):.2e}"
            else:
                err, err_ref = rel_err(out, out_exact), rel_err(out_ref, out_exact)
                assert err <= max(BF16_TOL, BF16_SLACK * err_ref), f"output {i}: {err:.2e} (reference {err_ref:.2e})"


SHAPES = [  # batch, d_model, d_inner, d_state, dt_rank, d_conv, dtype
    (2, 24, 40, 5, 3, 4, torch.float32), pytest.param(17, 24, 40, 5, 3, 4, torch.bfloat16, marks=release),
    (1, 48, 200, 16, 13, 4, torch.bfloat16),
    (3, 20, 7, 1, 1, 2, torch.float32)]


@interp
@pytest.mark.parametrize("kind", ["mixer", pytest.param("block", marks=release)])
@pytest.mark.parametrize("batch,d_model,d_in,dstate,dt_rank,width,dtype", SHAPES)
def test_interp_step_matches_reference(kind, batch, d_model, d_in, dstate, dt_rank, width, dtype):
    check_step(kind, batch, d_model, d_in, dstate, dt_rank, width, dtype, "cpu", steps=2)


@interp
@pytest.mark.parametrize("kind", ["mixer", pytest.param("block", marks=release)])
def test_interp_step_without_biases_or_residual(kind):
    check_step(kind, 2, 20, 24, 16, 7, 3, torch.float32, "cpu", steps=2, conv_bias=False, dt_bias=False,
               first_layer=True)


def test_steps_reject_bad_input():
    weights, (conv_state, ssm_state), _ = make_step_inputs(1, 6, 8, 4, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown"):
        run_step("mixer", dict(xz=torch.zeros(1, 16)), (conv_state, ssm_state), weights, "cuda")
    with pytest.raises(ValueError, match="unknown"):
        run_step("block", dict(h=torch.zeros(1, 6), residual=None), (conv_state, ssm_state), weights, "cuda")
    if not INTERPRET and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            run_step("block", dict(h=torch.zeros(1, 6), residual=None), (conv_state, ssm_state), weights, "triton")


# ---------------------------------------------------------------- the model: decoding equals the full forward

def make_model(backend, device="cpu", seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(d_model=24, n_layer=2, vocab_size=53, d_state=5, d_conv=3, expand=2, scan_backend=backend)
    return randomize_parameters(LanguageModel(MambaConfig(**{**fields, **overrides})), scale=0.2).to(device)


@torch.no_grad()
def use_step(model, device, step):
    """Run the Mamba-1 layers' decoding step `step` on `device` from now on, every other kernel as chosen."""
    own = model.kernels_for(torch.device(device))
    model.use_kernels(device, dataclasses.replace(own, mamba1=dataclasses.replace(own.mamba1, step=step)))


def check_decoding_matches_forward(model, ids, prompt_len, tol, reference_kernels=None):
    """Prefill the first prompt_len tokens, then step through the rest with the model's own kernels: each step's
    logits equal the full forward's at that position. reference_kernels: run the forward and the prefill with these
    instead (under the interpreter the Triton scan of a whole sequence takes many seconds; test_fused_model.py
    checks it against the reference)."""
    device = ids.device
    own = model.kernels_for(device)
    model.use_kernels(device, reference_kernels or own)
    logits, _ = model(ids)                                                     # (b, l, v)
    cache = model.init_cache(ids.shape[0])
    first = model.prefill(ids[:, :prompt_len], cache)
    assert rel_err(first, logits[:, prompt_len - 1]) < tol
    model.use_kernels(device, own)
    for t in range(prompt_len, ids.shape[1]):
        step = model.step(ids[:, t], cache)
        assert rel_err(step, logits[:, t]) < tol, f"position {t}: {rel_err(step, logits[:, t]):.2e}"


@interp
@pytest.mark.parametrize("step", ["triton_block", pytest.param("triton", marks=release)])
def test_interp_fused_decoding_matches_forward(step):
    model = make_model("triton")
    assert model.kernels_for(torch.device("cpu")).mamba1.step == "triton"         # the default with Triton
    use_step(model, "cpu", step)
    ids = torch.randint(0, 53, (2, 5), generator=torch.Generator().manual_seed(1))
    check_decoding_matches_forward(model, ids, prompt_len=3, tol=2e-5, reference_kernels=ModelKernels())


@interp
def test_interp_adapters_on_the_projections_still_act():
    """A LoRA adapter wraps in_proj, x_proj and dt_proj: the fused steps, which read their weights, must not run (the
    adapter's delta would be lost), and decoding still equals the forward through the adapters."""
    from models.lora import LoRAConfig, apply_lora

    model = make_model("triton")
    apply_lora(model, LoRAConfig(targets=["in_proj", "x_proj", "dt_proj"], rank=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)                                              # a non-zero adapter
    ids = torch.randint(0, 53, (1, 5), generator=torch.Generator().manual_seed(2))
    check_decoding_matches_forward(model.eval(), ids, prompt_len=3, tol=2e-5,
                                   reference_kernels=ModelKernels())


# ---------------------------------------------------------------- sm_90 compilation, launcher, GPU

@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels, not the interpreter's")
@pytest.mark.parametrize("d_model,d_in,dstate,dt_rank,width", [(768, 1536, 16, 48, 4), (2560, 5120, 16, 160, 4),
                                                               (20, 40, 5, 3, 3)])
def test_kernels_compile_for_hopper(d_model, d_in, dstate, dt_rank, width):
    """Compile the three kernels for sm_90 (Triton ships ptxas; no GPU needed) at mamba-130m's and mamba-2.8b's
    shapes and an awkward one, so that a kernel the compiler rejects fails CI rather than the first GPU run."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.triton_decode_step import (_conv_x_proj_kernel, _dt_state_update_kernel, _norm_in_proj_conv_kernel,
                                            block_config, parts_per_load, step_config)

    fp32 = {"res_ptr", "res_out_ptr", "parts_ptr", "state_ptr"}
    cfg = step_config(d_in, dstate, dt_rank, width)
    block = block_config(d_model, d_in, dstate, dt_rank, width)
    four_warps = {"num_warps": 4}
    for fn, constexprs, options in (
            (_conv_x_proj_kernel, dict(K=width, BLOCK_K=cfg["BLOCK_K"], HAS_CONV_BIAS=True, BLOCK_C=cfg["BLOCK_C"],
                                       BLOCK_O=cfg["BLOCK_O"]), four_warps),
            (_norm_in_proj_conv_kernel, dict(D_MODEL=d_model, HAS_RES=True, K=width, BLOCK_K=block["BLOCK_K"],
                                             HAS_CONV_BIAS=True, BLOCK_B=block["BLOCK_B"], BLOCK_C=block["BLOCK_C"],
                                             BLOCK_M=block["BLOCK_M"], BLOCK_O=block["BLOCK_O"], UPCAST=False),
             {"num_warps": block["num_warps"], "num_stages": block["num_stages"]}),
            *((_dt_state_update_kernel, dict(HAS_DT_BIAS=True, BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"],
                                             BLOCK_R=cfg["BLOCK_R"], N_PARTS=n_parts, BLOCK_P=parts_per_load(n_parts)),
               four_warps) for n_parts in (cfg["n_parts"], block["n_parts"]))):
        signature = {name: "constexpr" if name in constexprs else ("*fp32" if name in fp32 else "*bf16")
                     if name.endswith("_ptr") else "fp32" if name == "eps" else "i32" for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32), options=options)
        assert len(kernel.asm["cubin"]) > 0


@pytest.mark.skipif(INTERPRET, reason="this is the launcher of the interpreter run")
def test_interpreter_suite():
    """Run this module's `interp` tests in a fresh interpreter with TRITON_INTERPRET=1 (see the module doc)."""
    run_interpreter_suite(__file__)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mixer", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,d_model,d_in,dstate,dt_rank,width", [
    (1, 768, 1536, 16, 48, 4), (64, 768, 1536, 16, 48, 4), (3, 2560, 5120, 16, 160, 4), (17, 50, 100, 7, 5, 3)])
def test_gpu_step_matches_reference(kind, batch, d_model, d_in, dstate, dt_rank, width, dtype):
    check_step(kind, batch, d_model, d_in, dstate, dt_rank, width, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("step", ["triton_block", "triton"])
def test_gpu_fused_decoding_matches_forward(step):
    model = make_model("auto", "cuda", d_model=128, n_layer=3, d_state=16, d_conv=4, vocab_size=300)
    assert model.kernels_for(torch.device("cuda")).mamba1.step == "triton"
    use_step(model, "cuda", step)
    ids = torch.randint(0, 300, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    check_decoding_matches_forward(model, ids, prompt_len=17, tol=1e-4)
