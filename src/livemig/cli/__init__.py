"""Command-line interface: commands, machine processes, control sockets."""
