"""Where chunk bytes live: L1 (local files), L2 (memcached), durable (object store)."""
