"""The bottom layer of ``lightning_peft``: what the methods and everything above them share.

The adapter-layer protocol and ``Method`` (``adapter``), errors, name matching (``matching``),
config checks shared by the methods (``config``), bitsandbytes detection, import and
de-quantization (``bnb``), finite-value checks (``finite``) and small torch.distributed helpers
(``distributed``). It imports ``torch`` and ``peft_kernels`` only, never Lightning.
"""
