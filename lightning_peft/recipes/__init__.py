"""Ready-made Lightning pieces on top of the integration layer: tasks (LightningModules), data modules, the offline
assets and the ``lightning-peft`` command line."""
