"""``deltatune merge``: bake a saved adapter into its base model and save a plain model folder."""

from __future__ import annotations

import os
from pathlib import Path

from deltatune.core.state import read_adapter
from deltatune.train.adapter_info import load_adapted
from deltatune.train.files import replace_dir


def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike, model: str | None = None) -> Path:
    """Bake ``adapter`` into its base model and ``save_pretrained`` the result (with the
    tokenizer) into ``out``, written whole or not at all."""
    read_adapter(adapter)  # clear errors for a broken folder before the model loads
    adapted, tokenizer, _ = load_adapted(adapter, model)
    plain = adapted.merge_and_unload()

    def fill(tmp: Path) -> None:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    replace_dir(out, fill)
    return Path(out)
