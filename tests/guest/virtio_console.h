/*
 * virtio-console driver (virtio 1.x, section 5.3) over virtio-mmio v2, polled,
 * with VIRTIO_CONSOLE_F_MULTIPORT: queues 0/1 are port 0's receive/transmit,
 * 2/3 the control receive/transmit, 4/5 port 1's.  Control messages are
 * struct virtio_console_control (le32 id, le16 event, le16 value), PORT_NAME
 * followed by the name.
 */
#ifndef SVTEST_VIRTIO_CONSOLE_H
#define SVTEST_VIRTIO_CONSOLE_H

#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_CONSOLE_F_MULTIPORT 1
#define VIRTIO_CONSOLE_CFG_MAX_NR_PORTS 4

#define VIRTIO_CONSOLE_DEVICE_READY 0
#define VIRTIO_CONSOLE_PORT_ADD 1
#define VIRTIO_CONSOLE_PORT_REMOVE 2
#define VIRTIO_CONSOLE_PORT_READY 3
#define VIRTIO_CONSOLE_CONSOLE_PORT 4
#define VIRTIO_CONSOLE_RESIZE 5
#define VIRTIO_CONSOLE_PORT_OPEN 6
#define VIRTIO_CONSOLE_PORT_NAME 7

#endif
