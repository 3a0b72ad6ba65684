"""Lookahead parallelism: how ranks split a step, agree on it, join a process group and shard a replica."""
