"""Framework adapters: one small module per framework (transformers/TRL, LLaMA-Factory, OpenRLHF,
Axolotl, ms-swift), plus what DeepSpeed and FSDP need whatever framework drives them."""
