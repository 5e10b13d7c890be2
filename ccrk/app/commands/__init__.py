"""One module per CLI verb. Each defines ``add_parser(subparsers)`` which registers the verb
and sets ``func`` (called with the parsed args; returns the exit code or None)."""
