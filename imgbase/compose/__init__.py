"""Compose: layers -> root tree (a backend) -> shared post-processing -> squashfs + manifest."""
