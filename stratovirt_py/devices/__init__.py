"""Emulated devices and the buses the vCPUs reach them through."""
