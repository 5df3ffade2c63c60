"""PEFT methods. Importing this package registers every method with the core registry."""

from deltatune.methods import lora  # noqa: F401  (registers "lora")
