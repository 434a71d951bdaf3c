"""Measurements that settle a default or a claim."""
