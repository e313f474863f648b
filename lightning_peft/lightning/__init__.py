"""PyTorch Lightning integration: ``PEFTCallback`` (``callback``) and the jobs it delegates:
checkpoints and resume (``checkpoints``), gradient and finite-value checks (``checks``), saving
with a fallback (``saving``), FSDP2 (``distributed``), quantization under
``BitsandbytesPrecision`` (``precision``) and random state (``random_state``)."""
