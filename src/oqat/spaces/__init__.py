"""Packaged search-space presets (YAML); load them with ``SearchSpace.preset(name)``."""
