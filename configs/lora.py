"""LoRA target sets, as data: which linear modules get adapters (models/lora.py matches them by the last part of
the module's name, as PEFT does).

A preset lists every name it may target; names a model does not have are skipped (attention projections only
exist in attention layers), but at least one must match. A list given by name on the command line
(`--lora in_proj,x_proj`) is strict: each name must exist.
"""

# the attention projections of attention layers (hybrid models); a pure Mamba-1 model has none
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]

LORA_TARGETS = {
    # the mixer's input projection: most of a Mamba layer's weights, the cheapest useful adapter
    "minimal": ["in_proj"],
    # the mixer's two large projections (the "attention-like" in/out of each layer)
    "attention_only": ["in_proj", "out_proj", *ATTENTION_PROJECTIONS],
    # ... plus the step-size projection, which steers what the state keeps
    "all": ["in_proj", "out_proj", "dt_proj", *ATTENTION_PROJECTIONS],
    # ... plus x_proj (dt, B, C of the selective scan)
    "all_x_proj": ["in_proj", "out_proj", "dt_proj", "x_proj", *ATTENTION_PROJECTIONS],
}

# modules that PEFT (>= 0.16) refuses to put LoRA on for Mamba models (peft.tuners.tuners_utils); an adapter on
# them loads here but not with peft.PeftModel: merge it into a plain checkpoint instead
PEFT_REFUSED_ON_MAMBA = ("out_proj", "conv1d")

# modules whose adapter transformers' MambaMixer silently skips: it computes `self.dt_proj.weight @ dt` instead of
# calling the module (transformers 5.x, slow and fast path alike), so PEFT's LoRA on dt_proj has no effect there.
# Our model calls every projection as a module, so the adapter acts here; for transformers, merge it.
NOT_HONOURED_BY_TRANSFORMERS = ("dt_proj",)

DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0


def lora_targets(spec: str) -> tuple[list[str], bool]:
    """--lora's value -> (module names, strict). A preset name gives its list (lenient: names a model lacks are
    skipped); anything else is a comma-separated list of module names, each of which must exist."""
    if spec in LORA_TARGETS:
        return list(LORA_TARGETS[spec]), False
    names = [n.strip() for n in spec.split(",")]
    if not spec.strip() or not all(n.isidentifier() for n in names):
        raise ValueError(f"lora {spec!r} is neither a preset ({', '.join(LORA_TARGETS)}) nor a comma-separated "
                         f"list of module names such as in_proj,x_proj")
    return names, True
