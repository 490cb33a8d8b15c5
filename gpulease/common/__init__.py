"""Code the tiers share: the error catalog for servicers (grpc_errors) and the one rule that reads a
status back (rpc_status), settings and shared limits, units, the event loop choice and systemd
notification. Imports no server dependency, so the client may use it too."""
