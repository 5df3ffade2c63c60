"""Every JSON object read from untrusted input (data-set lines, adapter configs, safetensors
metadata) goes through one bounded parser, so each source refuses the same damage clearly."""

import json

import pytest
import torch
from safetensors.torch import save_file

from deltatune.core.diffusers_files import read_diffusers_folder
from deltatune.errors import AdapterFileError, ConfigError
from deltatune.train.data import read_rows

DAMAGE = {"not json": "{'r': 8}", "not an object": "[1, 2]", "too deep": "[" * 40 + "]" * 40,
          "deeper than the parser's stack": "[" * 100_000 + "]" * 100_000}
REASONS = {"not json": "is not valid JSON", "not an object": "does not hold a JSON object",
           "too deep": "deeper than 16 levels", "deeper than the parser's stack": "deeper than 16 levels"}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_bad_jsonl_line_is_a_config_error_naming_the_file_and_line(tmp_path, damage):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "fine", "label": 1}) + "\n\n" + DAMAGE[damage] + "\n")
    with pytest.raises(ConfigError, match=rf"train.jsonl, line 3 .*{REASONS[damage]}"):
        read_rows(str(path))
    path.write_text(json.dumps({"text": "fine", "label": 1}) + "\n")
    assert read_rows(str(path)) == [{"text": "fine", "label": 1}]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_bad_diffusers_metadata_header_is_an_adapter_file_error(tmp_path, damage):
    tensors = {"unet.down.lora_A.weight": torch.zeros(2, 4), "unet.down.lora_B.weight": torch.zeros(4, 2)}
    save_file(tensors, str(tmp_path / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": DAMAGE[damage]})
    with pytest.raises(AdapterFileError, match=f"lora_adapter_metadata header .*{REASONS[damage]}"):
        read_diffusers_folder(tmp_path)
