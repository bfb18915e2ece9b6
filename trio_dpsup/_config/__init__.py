"""Configuration: the settings and their options (options.py, config.py), their enums
(enums.py), the config file, presets, device names (devices.py), TLS files (tls.py), the
routers to feed (routers.py), and the rank plan (plan.py).

May import: `_output` (redaction), `_gpu` (the inventory's types), `_errors`.
"""
