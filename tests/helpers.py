"""Shared test helpers."""
import torch


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Random (not initial) values in every parameter of a Mamba model (ours or transformers'), so that no term of
    the math hides behind a 0 or a 1: A_log, D, the norms and the dt bias included. Returns the model in eval mode."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.randn_like(p) * 0.5)
        elif name.endswith(("norm.weight", "norm_f.weight", ".D")):
            p.copy_(1 + 0.3 * torch.randn_like(p))
        elif name.endswith("dt_proj.bias"):
            p.copy_(torch.randn_like(p) - 2)
        else:
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()
