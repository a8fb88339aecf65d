"""Framework adapters: one small module per framework (transformers/TRL, LLaMA-Factory, OpenRLHF)."""
