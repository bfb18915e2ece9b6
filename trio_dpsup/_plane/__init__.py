"""The surfaces the outside talks to: the control plane (control.py on our own h11 server,
http_server.py) with discovery for routers and Prometheus, the metrics, the operator's
admin socket (admin_socket.py) and actions (admin.py) with their client (ctl.py) and typed
protocol (protocol.py), the watch between the members of a group across nodes
(peers.py: their GET /group), and the report of how a run ended (outcome.py).

May import: `_state`, `_config`, `_output`, `_errors`, `_version`. Never `_ranks`: an operator's
action reaches a rank through the board's records, which the rank's own task acts on.
"""
