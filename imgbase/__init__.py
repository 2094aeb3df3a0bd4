"""imgbase: image-based hypervisor nodes on LVM thin pools."""

__version__ = "0.1.0"
