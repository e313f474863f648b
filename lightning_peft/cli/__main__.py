"""``python -m lightning_peft.cli``."""

from lightning_peft.cli.app import main

main()
