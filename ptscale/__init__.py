"""ptscale: prefix-tuned parameter-efficient fine-tuning (PT-PEFT) under DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
