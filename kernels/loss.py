"""The LM head and its cross-entropy in one step, without the (tokens, vocab) fp32 logits of the whole batch.

    loss = mean over tokens with target != ignore_index of  logsumexp(hidden_t @ W^T) - (hidden_t @ W^T)[target_t]

The plain way (`linear_cross_entropy_plain`, what models/lm.py does with return_logits=True) materialises the logits
of every token, their fp32 copy and the fp32 gradient of that copy: at 8 x 2048 tokens and a 50280-word vocabulary that is
16384 * 50280 * (2 + 4 + 4 + 2) bytes ~ 9.9 GB for one loss.

`linear_cross_entropy` walks the tokens in chunks instead. For each chunk, inside the forward:

    logits  = h_c @ W^T                     (n_c, V) in the compute dtype (bf16 under autocast)
    lse     = logsumexp(logits.float())     fp32
    loss   += sum(lse - logits[target])     fp32
    dlogits = (softmax - onehot(target)) / n_valid      (zero rows for ignored tokens), cast to the compute dtype
    dh_c    = dlogits @ W                   written into dhidden (n, d)
    dW     += dlogits^T @ h_c               accumulated in fp32

so the gradients are finished when the forward returns; the chunk's logits are dropped at once, and the backward
only scales the saved dhidden and dW by the incoming gradient (a scalar). The chunk is sized so that its fp32 logits
take about CHUNK_BYTES (256 MB on CUDA, 32 MB on the CPU). The price: the forward does the backward's two matmuls
even when no backward follows; they are skipped when neither input needs a gradient (evaluation).

Precision, and autocast. A custom autograd.Function is not autocast-aware by itself, so the compute dtype is chosen
explicitly in `linear_cross_entropy`, before the Function runs: under autocast for hidden's device type it is
torch.get_autocast_dtype(device type) (what autocast would give F.linear), otherwise hidden's dtype; hidden and W
are cast to it for the matmuls, exactly as autocast would, and the Function's body runs with autocast off so nothing
else is re-cast behind its back. Softmax, logsumexp and the loss are fp32. dW is the sum of per-chunk products in
the compute dtype (each rounded once, as the plain backward's single product is) added in fp32; the gradients come
back in hidden's and W's own dtypes, so a tied embedding/head parameter receives the sum of both uses through
autograd as usual.

All targets ignored: the loss is nan (0 / 0), as F.cross_entropy's mean gives, and both gradients are zero (as
PyTorch's are).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 32 * 2**20}     # fp32 logits of one chunk, per device type


def default_chunk_tokens(vocab: int, device: torch.device | str) -> int:
    """Tokens per chunk whose fp32 logits take about CHUNK_BYTES on `device`."""
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES["cpu"])
    return max(1, budget // (4 * max(vocab, 1)))


def compute_dtype_for(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's for hidden's device type when autocast is on there (as
    F.linear would get), else hidden's own."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def linear_cross_entropy_plain(hidden, weight, targets, ignore_index=-100):
    """The reference: full logits, then F.cross_entropy on their fp32 copy (models/lm.py with return_logits=True)."""
    logits = F.linear(hidden, weight)                                            # (..., V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)


class LinearCrossEntropy(torch.autograd.Function):
    """Loss, dhidden and dW chunk by chunk in the forward; the backward scales the saved gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_tokens, compute_dtype, need_dh, need_dw):
        # hidden: (n, d); weight: (V, d); targets: (n,) long
        n = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            valid = targets != ignore_index                                      # (n,)
            n_valid = valid.sum()
            # 1 / n_valid, and 0 instead of inf when every token is ignored (the gradient is then zero)
            inv_valid = 1.0 / n_valid.clamp_min(1).to(torch.float32)
            safe_targets = torch.where(valid, targets, 0)
            loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
            dh = torch.empty_like(h) if need_dh else None                        # (n, d) compute dtype
            dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_dw else None
            for start in range(0, n, chunk_tokens):
                end = min(start + chunk_tokens, n)
                h_c, t_c, v_c = h[start:end], safe_targets[start:end], valid[start:end]
                logits = (h_c @ w.t()).float()                                   # (n_c, V) fp32
                target_logit = logits.gather(1, t_c[:, None]).squeeze(1)         # (n_c,)
                # logsumexp by hand, in place over the logits (torch.logsumexp would allocate another (n_c, V))
                row_max = logits.amax(dim=-1, keepdim=True)                      # (n_c, 1)
                exp = logits.sub_(row_max).exp_()                                # (n_c, V) exp(logit - max)
                sum_exp = exp.sum(dim=-1, keepdim=True)                          # (n_c, 1)
                lse = (row_max + sum_exp.log()).squeeze(1)                       # (n_c,)
                loss_sum = loss_sum + torch.where(v_c, lse - target_logit, 0.0).sum()
                if need_dh or need_dw:
                    # dlogits = (softmax - onehot) * valid / n_valid, in place
                    probs = exp.div_(sum_exp)
                    probs.scatter_add_(1, t_c[:, None], torch.full_like(target_logit[:, None], -1.0))
                    probs.mul_((v_c.to(torch.float32) * inv_valid)[:, None])
                    dlogits = probs.to(compute_dtype)                             # (n_c, V)
                    if need_dh:
                        dh[start:end] = dlogits @ w                               # (n_c, d)
                    if need_dw:
                        dw += (dlogits.t() @ h_c).float()                         # (V, d)
            loss = loss_sum / n_valid.to(torch.float32)                           # nan when every token is ignored
        ctx.save_for_backward(dh, dw)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        dhidden = (dh * grad_loss).to(ctx.hidden_dtype) if dh is not None else None
        dweight = (dw * grad_loss).to(ctx.weight_dtype) if dw is not None else None
        return dhidden, dweight, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, chunk_tokens=None):
    """Mean cross-entropy of the logits hidden @ weight^T against targets, without materialising all the logits.

    Equal, in value and in the gradients of hidden and weight, to
    F.cross_entropy((hidden @ weight.T).float().view(-1, V), targets.view(-1), ignore_index=ignore_index).

    Args:
        hidden: (b, l, d) or (n, d), any float dtype (bf16 under autocast is the intended use)
        weight: (V, d), e.g. the LM head's weight (may be tied to the embedding)
        targets: (b, l) or (n,) long; ignore_index marks tokens left out of the mean
        chunk_tokens: tokens per chunk; None picks ~CHUNK_BYTES of fp32 logits per chunk for the device;
            0 runs the plain version (linear_cross_entropy_plain: all logits at once)
    Returns:
        the loss, an fp32 scalar (nan if every target is ignored, as PyTorch's)
    """
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight must be (V, d={d}), got {tuple(weight.shape)}")
    if targets.numel() * d != hidden.numel():
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden {tuple(hidden.shape)}")
    if chunk_tokens == 0:
        return linear_cross_entropy_plain(hidden, weight, targets, ignore_index)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0], hidden.device)
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 or None, got {chunk_tokens}")
    grad_on = torch.is_grad_enabled()
    return LinearCrossEntropy.apply(hidden.reshape(-1, d), weight, targets.reshape(-1), ignore_index, chunk_tokens,
                                    compute_dtype_for(hidden), grad_on and hidden.requires_grad,
                                    grad_on and weight.requires_grad)
