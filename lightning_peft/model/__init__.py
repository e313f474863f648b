"""Adapters in a model: which modules are targeted (``targeting``), injection (``injection``),
merge / unmerge / unload / disable and the adapter state dict (``helpers``), LoRA+ parameter
groups (``lora_plus``). Written against the method registry and the adapter-layer protocol."""
