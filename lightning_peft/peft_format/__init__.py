"""Adapters in the Hugging Face PEFT format: save and load (``files``), and the singular-value
report of a saved LoRA adapter (``spectrum``, ``lightning-peft inspect``)."""
