"""Configuration: the settings and their options, the config file, presets, the rank plan."""
