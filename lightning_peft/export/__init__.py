"""Writing and reading adapters and merged models in the formats the ecosystem reads."""
