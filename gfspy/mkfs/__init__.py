"""gfspy-mkfs: make a GFS2 filesystem laid out exactly as mkfs.gfs2 3.5.0 lays it out."""
