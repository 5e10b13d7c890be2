"""The application layer: the ``ccrk`` command line (:mod:`ccrk.app.cli`, one verb per module in
:mod:`ccrk.app.commands`), its terminal output (:mod:`ccrk.app.console`) and the Prefect server it
starts for a command (:mod:`ccrk.app.prefect_api`). It imports :mod:`flows` and the library; nothing
below it imports it (ARCHITECTURE.md)."""
