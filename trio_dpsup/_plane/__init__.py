"""The surfaces the outside talks to: the control plane (control.py on our own h11 server,
http_server.py) with discovery for routers and Prometheus, the metrics, and the operator's
admin socket (admin.py) with its client (ctl.py) and their typed protocol (protocol.py).

May import: `_state`, `_config`, `_errors`, `_version`. Never `_ranks`: an operator's
action reaches a rank through the board's records, which the rank's own task acts on.
"""
