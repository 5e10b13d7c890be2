"""Data at rest: source adapters, image download, K-lingual shards, manifests, the artifact catalog."""
