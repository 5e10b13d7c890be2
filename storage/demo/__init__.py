"""The embedded demo: a synthetic shapes corpus, its caption grammar in five languages, a loopback server."""
