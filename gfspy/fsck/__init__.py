"""gfspy-fsck: a read-only checker of every GFS2 on-disk invariant."""
