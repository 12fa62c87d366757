"""stratovirt-py: a KVM microVM monitor compatible with StratoVirt's command line and QMP."""

__version__ = "0.1.0"
