"""Helpers every layer may use and that know nothing of networks: typed configs from YAML,
atomic files, devices and threads, number formatting, rank statistics."""
