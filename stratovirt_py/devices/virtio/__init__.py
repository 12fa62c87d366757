"""virtio devices: the virtio-mmio transport and the devices behind it."""
