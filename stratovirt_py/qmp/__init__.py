"""QMP: the management protocol on unix sockets."""
