"""Bastion gateway: reach private VMs through one public port."""

__version__ = "0.1.0"
