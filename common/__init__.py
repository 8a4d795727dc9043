"""Contracts shared by the pipeline, the trainer and the launchers: typed YAML configs, model resolution, ports."""
