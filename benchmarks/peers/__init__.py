"""guard beside a peer library in one process (ratios of the same run)."""
