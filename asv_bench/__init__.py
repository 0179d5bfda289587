"""asv benchmark suite of Dendrite (see asv.conf.json at the repo top)."""
