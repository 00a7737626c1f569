"""Job files (docs/jobs.md): ``load`` reads and checks them (every problem of every job at once),
``schema`` prints their JSON Schema (``tokenflow schema``), ``run`` runs them (``tokenflow run``).

A job file is a YAML mapping of EditConfig settings (plus ``name`` and ``preset``), read as data
only; its values are judged by ``EditConfig.errors()``, the one validator.
"""
