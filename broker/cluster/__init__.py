"""Running as more than one process: the Redis Streams backplane and the worker supervisor."""
