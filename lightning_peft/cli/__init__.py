"""The ``lightning-peft`` command (``lightning_peft.cli:main``): a LightningCLI over the tasks
(``tasks``), the data (``data``, ``prompts``), the embedded models (``embedded``), learning
curves (``curves``) and one set of options per registered method (``methods``)."""

from lightning_peft.cli.app import main

__all__ = ["main"]
