"""Files: HF peft adapter directories, lightning_peft's own format for methods peft cannot read, crash-safe
writes, and merged transformers exports."""
