"""Adapters in a model: which modules are targeted (``targeting``), injection (``injection``),
merge / unmerge / unload / disable and the adapter state dict (``helpers``), LoRA+ parameter
groups (``lora_plus``), named adapters (``sites``: where they sit and how a layer routes;
``named``: active set, delete, parameter groups) and mixed-adapter batches (``mixed``). Written
against the method registry and the adapter-layer protocol."""
