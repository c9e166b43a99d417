"""Service plumbing: settings, Redis pool, model store, job records, Redis keys, `quark up`."""
