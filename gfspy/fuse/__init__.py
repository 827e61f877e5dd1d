"""The pyfuse3 adapter and mount.gfspy: kernel requests in, gfspy.fs calls out."""
