"""Lightning integration: the injection pipeline, PEFTCallback, PEFTMixin, adapter-only checkpoints, every
strategy rule, distributed broadcast and gathering, the resumable loader. Imports formats/ and everything below."""
