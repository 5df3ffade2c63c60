"""k-bit base models: quantize a loaded model to 4-bit NF4 / 8-bit (bitsandbytes), prepare it for
training, and measure it. LoRA on top is the ordinary LoRA ("QLoRA is LoRA over a quantized base").
"""

from deltatune.quant.bnb import quantization_report, quantize, register_bnb_handlers
from deltatune.quant.prepare import prepare_for_kbit_training

register_bnb_handlers()

__all__ = ["quantize", "prepare_for_kbit_training", "quantization_report"]
