"""The product around the method: the ``tokenflow`` CLI and its subcommands, whole jobs (output
checks, locks, staging, reports), job files, the Ray farm, doctor, export."""
