"""gfspy-blockd: the NBD storage server with a fencing control channel."""
