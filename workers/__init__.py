"""lora-workers: Kafka-driven workers serving many LoRA adapters on one base model with vLLM."""

__version__ = "0.1.0"
