"""Configuration: the settings and their options (options.py, config.py), their enums
(enums.py), the config file, presets, device names (devices.py), TLS files (tls.py), the
routers to feed (routers.py), the rank plan (plan.py), and this node's membership of a
group across nodes (group.py: --group-peer or LeaderWorkerSet's environment).

May import: `_output` (redaction), `_gpu` (the inventory's types), `_errors`.
"""
