"""Machinery every PEFT method shares: finding targets, swapping modules, freezing, adapter state."""
