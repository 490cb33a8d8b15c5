"""gpulease agent: runs on each GPU server, registers it with the coordinator and keeps it alive."""
