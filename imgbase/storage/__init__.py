"""Storage on the node: LVM thin pool, bases, layers and volumes."""
