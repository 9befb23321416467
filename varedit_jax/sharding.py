"""Logical axis names for parameters and activations, and their default mapping onto the mesh.

Model code annotates every parameter with logical names (one per array dimension), e.g.
`nnx.Param(w, out_sharding=("embed", "mlp"))` or `nnx.with_partitioning(init, ("embed", "mlp"))`.
Configs map logical names to mesh axes (`config.mesh.rules`, defaulting to `DEFAULT_RULES`); a name mapped to
None is replicated. The mesh axes are ("data", "fsdp", "tensor").

Vocabulary (parameters):
  embed       transformer width C                          -> fsdp
  heads       fused attention features (heads * head_dim)  -> tensor
  mlp         FFN hidden width                             -> tensor
  text_embed  text-encoder width (T5 d_model, Ctext)       -> replicated
  vocab       output logits (2 * bits) / token vocabulary  -> replicated
  bits        tokenizer bits d (word_embed input)          -> replicated
  layers      stacked (scanned) block axis                 -> replicated
  norm        norm scales / small per-channel vectors      -> replicated
  conv_in, conv_out, conv_h, conv_w   tokenizer convolutions (HWIO) -> replicated
  unmodeled   anything small that should never be sharded  -> replicated
Activations: batch -> (data, fsdp); length, act_embed -> replicated.
"""
MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("text_embed", None),
    ("vocab", None),
    ("bits", None),
    ("layers", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", None),
    ("conv_h", None),
    ("conv_w", None),
    ("unmodeled", None),
    ("length", None),
    ("act_embed", None),
)
