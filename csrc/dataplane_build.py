"""cffi (API mode) build script for the C data plane (csrc/dataplane/).

Python only configures these structs (queue addresses, backend fds, features)
and reads a few fields (interrupt status, broken, statistics); every
per-request path runs in C on the I/O thread, without the GIL.
"""

import os
from pathlib import Path

from cffi import FFI

DATAPLANE = Path(__file__).resolve().parent / "dataplane"
SOURCES = ["virtqueue.c", "virtio_device.c", "iothread.c", "virtio_blk.c", "virtio_net.c",
           "virtio_balloon.c", "vcpu_fastpath.c", "virtio_console.c", "virtio_rng.c",
           "sandbox.c"]

CDEF = """
struct iovec { void *iov_base; size_t iov_len; };

#define SVPY_MAX_MEM_REGIONS ...
#define SVPY_VQ_MAX_SIZE ...
#define SVPY_CHAIN_MAX_SEGMENTS ...
#define SVPY_BLK_ID_BYTES ...
#define SVPY_INT_VRING ...
#define SVPY_INT_CONFIG ...
#define SVPY_DEV_ERR_STATUS_CLEARED ...
#define SVPY_BLK_SEG_MAX ...
#define SVPY_BLK_SIZE_MAX ...
#define SVPY_BLK_MAX_REQUEST_BYTES ...
#define SVPY_BLK_MAX_DISCARD_SECTORS ...
#define SVPY_BLK_MAX_DISCARD_SEGMENTS ...
#define SVPY_BLK_MAX_WRITE_ZEROES_SECTORS ...
#define SVPY_BLK_MAX_WRITE_ZEROES_SEGMENTS ...
#define SVPY_BLK_PASS_MAX_REQUESTS ...
#define SVPY_BLK_PASS_MAX_BYTES ...
#define SVPY_BLK_AIO_DEPTH ...

struct svpy_mem_region { uint64_t gpa; uint64_t size; uint8_t *hva; };
struct svpy_guest_memory { uint32_t count; struct svpy_mem_region regions[4]; };

struct svpy_virtqueue {
    uint16_t size;
    uint8_t event_idx;
    uint8_t indirect;
    uint64_t desc_gpa;
    uint64_t avail_gpa;
    uint64_t used_gpa;
    uint8_t active;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    ...;
};

struct svpy_chain {
    uint16_t head;
    uint16_t readable;
    uint16_t writable;
    uint64_t readable_bytes;
    uint64_t writable_bytes;
    struct iovec iov[];
    ...;
};

struct svpy_virtio_shared {
    uint32_t interrupt_status;
    int32_t broken;
    int irqfd;
    int error_fd;
    ...;
};

struct svpy_blk_stats {
    uint64_t requests;
    uint64_t read_bytes;
    uint64_t written_bytes;
    uint64_t errors;
    uint64_t yields;
    uint64_t aio_submits;
};

struct svpy_blk_request {
    uint8_t in_use;
    ...;
};

#define SVPY_MAX_QUEUES ...
struct svpy_device {
    struct svpy_virtio_shared shared;
    unsigned num_queues;
    ...;
};

struct svpy_blk {
    struct svpy_device dev;
    struct svpy_virtqueue vq;
    int fd;
    int buffered_fd;
    uint64_t capacity;
    uint8_t read_only;
    uint8_t discard;
    uint8_t write_zeroes;
    char serial[20];
    struct svpy_blk_stats stats;
    unsigned long aio;
    uint32_t inflight;
    struct svpy_blk_request requests[...];
    ...;
};

struct svpy_net_stats {
    uint64_t rx_frames;
    uint64_t rx_bytes;
    uint64_t tx_frames;
    uint64_t tx_bytes;
    uint64_t rx_dropped;
    uint64_t tx_errors;
    uint64_t tx_dropped;
    uint64_t rx_stalls;
    uint64_t tx_stalls;
    uint64_t yields;
};

#define SVPY_NET_HDR_BYTES ...
#define SVPY_NET_MAX_FRAME ...
struct svpy_net {
    struct svpy_device dev;
    struct svpy_virtqueue rxq;
    struct svpy_virtqueue txq;
    uint8_t mrg_rxbuf;
    int tap_fd;
    uint8_t tap_lost;
    uint8_t rx_waiting;
    uint8_t tx_waiting;
    uint32_t pending_len;
    struct svpy_net_stats stats;
    ...;
};

struct svpy_balloon_counters {
    uint64_t inflated_pages;
    uint64_t deflated_pages;
    uint64_t reported_bytes;
    uint64_t bad_frames;
    uint64_t released_bytes;
    uint64_t madvise_errors;
    uint64_t stats_updates;
};

#define SVPY_BALLOON_QUEUES ...
#define SVPY_BALLOON_MAX_FRAMES_PER_CHAIN ...
#define SVPY_BALLOON_NONE ...
#define SVPY_BALLOON_INFLATE ...
#define SVPY_BALLOON_DEFLATE ...
#define SVPY_BALLOON_STATS ...
#define SVPY_BALLOON_REPORTING ...
struct svpy_balloon {
    struct svpy_device dev;
    struct svpy_virtqueue vqs[4];
    uint8_t roles[4];
    int release_advice;
    int32_t stats_head;
    uint32_t stats_len;
    uint8_t stats[...];
    int64_t stats_time;
    struct svpy_balloon_counters counters;
    ...;
};

struct svpy_rng_stats {
    uint64_t requests;
    uint64_t bytes;
    uint64_t empty;
    uint64_t read_errors;
    uint64_t throttled;
    uint64_t source_waits;
    uint64_t yields;
};

#define SVPY_RNG_MAX_REQUEST_BYTES ...
struct svpy_rng {
    struct svpy_device dev;
    struct svpy_virtqueue vq;
    int source_fd;
    uint64_t max_bytes;
    uint64_t period_ns;
    uint64_t budget;
    int timer_fd;
    uint8_t waiting;
    struct svpy_rng_stats stats;
    ...;
};

struct svpy_iothread {
    int epoll_fd;
    int failure_fd;
    int32_t failed_errno;
    const char *failed_call;
    ...;
};

int svpy_vq_activate(struct svpy_virtqueue *vq, const struct svpy_guest_memory *mem);
void svpy_vq_deactivate(struct svpy_virtqueue *vq);
int svpy_vq_pop(struct svpy_virtqueue *vq, const struct svpy_guest_memory *mem,
                struct svpy_chain *chain);
void svpy_vq_push(struct svpy_virtqueue *vq, uint16_t head, uint32_t written);
bool svpy_vq_enable_notify(struct svpy_virtqueue *vq);
bool svpy_vq_should_interrupt(struct svpy_virtqueue *vq);
const char *svpy_vq_error_name(int error);

void svpy_raise_interrupt(struct svpy_virtio_shared *shared, uint32_t cause);
uint32_t svpy_read_interrupt_status(struct svpy_virtio_shared *shared);
void svpy_ack_interrupt(struct svpy_virtio_shared *shared, uint32_t bits);
void svpy_mark_broken(struct svpy_virtio_shared *shared, int error);
const char *svpy_device_error_name(int error);
void svpy_lock(struct svpy_virtio_shared *shared);
void svpy_unlock(struct svpy_virtio_shared *shared);
void svpy_shared_destroy(struct svpy_virtio_shared *shared);

int svpy_iothread_start(struct svpy_iothread *thread);
void svpy_iothread_stop(struct svpy_iothread *thread);

#define SVPY_FASTPATH_MAX_DEVICES ...
struct svpy_console_output {
    int fd;
    uint8_t is_socket;
    uint8_t ready;
    uint32_t writers;
    uint64_t written;
    ...;
};
void svpy_console_output_set_ready(struct svpy_console_output *output, int ready);
struct svpy_uart_status {
    uint16_t lsr_port;
    uint16_t thr_port;
    uint8_t rx_ready;
    uint8_t thr_passthrough;
    struct svpy_console_output *output;
    ...;
};
struct svpy_mmio_fastpath {
    uint64_t base;
    uint64_t window_size;
    uint32_t count;
    struct svpy_virtio_shared *devices[16];
    uint64_t handled;
    uint64_t returned;
    struct svpy_uart_status *uart;
    ...;
};
long svpy_vcpu_run(int vcpu_fd, void *run, struct svpy_mmio_fastpath *fastpath);

int svpy_blk_init(struct svpy_blk *blk, const struct svpy_guest_memory *mem, int irqfd,
                  int error_fd, const int *kick_fds);
int svpy_blk_attach(struct svpy_blk *blk, struct svpy_iothread *thread);
void svpy_blk_process(struct svpy_blk *blk);
void svpy_blk_drain(struct svpy_blk *blk, int complete);
int svpy_blk_enable_aio(struct svpy_blk *blk);
void svpy_blk_destroy(struct svpy_blk *blk);

int svpy_net_init(struct svpy_net *net, const struct svpy_guest_memory *mem, int irqfd,
                  int error_fd, const int *kick_fds);
int svpy_net_attach(struct svpy_net *net, struct svpy_iothread *thread);
void svpy_net_start(struct svpy_net *net);
void svpy_net_stop(struct svpy_net *net);
int svpy_net_set_tap(struct svpy_net *net, int fd);
void svpy_net_destroy(struct svpy_net *net);

int svpy_balloon_init(struct svpy_balloon *balloon, const struct svpy_guest_memory *mem,
                      int irqfd, int error_fd, const int *kick_fds);
int svpy_balloon_attach(struct svpy_balloon *balloon, struct svpy_iothread *thread);
void svpy_balloon_start(struct svpy_balloon *balloon);
void svpy_balloon_stop(struct svpy_balloon *balloon);
int svpy_balloon_request_stats(struct svpy_balloon *balloon);
void svpy_balloon_destroy(struct svpy_balloon *balloon);

/* virtio-console (virtio_console.h) */
#define SVPY_CONSOLE_MAX_PORTS ...
#define SVPY_CONSOLE_MAX_QUEUES ...
#define SVPY_CONSOLE_OUT_BYTES ...
#define SVPY_CONSOLE_IN_BYTES ...
#define SVPY_CONSOLE_NAME_BYTES ...
#define SVPY_CONSOLE_CTRL_PENDING ...
#define VIRTIO_CONSOLE_F_MULTIPORT ...
struct svpy_console_counters {
    uint64_t tx_bytes;
    uint64_t written_bytes;
    uint64_t dropped_bytes;
    uint64_t rx_bytes;
    uint64_t write_errors;
};
struct svpy_console_port {
    unsigned nr;
    uint8_t present;
    uint8_t is_console;
    uint8_t keep_when_detached;
    uint8_t guest_ready;
    uint8_t guest_open;
    uint8_t host_open;
    uint8_t ready;
    uint8_t is_socket;
    uint8_t out_watched;
    int fd;
    uint32_t out_start;
    uint32_t out_len;
    uint32_t in_start;
    uint32_t in_len;
    struct svpy_console_counters counters;
    ...;
};
struct svpy_console {
    struct svpy_device dev;
    struct svpy_virtqueue vqs[...];
    unsigned max_nr_ports;
    uint8_t multiport;
    uint8_t driver_ready;
    uint32_t ctrl_len;
    uint64_t ctrl_dropped;
    uint64_t ctrl_received;
    struct svpy_console_port ports[...];
    ...;
};
int svpy_console_init(struct svpy_console *console, const struct svpy_guest_memory *mem,
                      int irqfd, int error_fd, const int *kick_fds, unsigned max_nr_ports);
int svpy_console_attach(struct svpy_console *console, struct svpy_iothread *thread);
int svpy_console_add_port(struct svpy_console *console, unsigned nr, int is_console,
                          int keep_when_detached, const char *name);
void svpy_console_start(struct svpy_console *console, int multiport);
void svpy_console_stop(struct svpy_console *console);
void svpy_console_port_attach(struct svpy_console *console, unsigned nr, int fd, int is_socket);
void svpy_console_port_set_ready(struct svpy_console *console, unsigned nr, int ready);
uint32_t svpy_console_input(struct svpy_console *console, unsigned nr, const uint8_t *data,
                            uint32_t len);
unsigned svpy_console_port_queue(unsigned nr, int tx);
void svpy_console_destroy(struct svpy_console *console);
int svpy_rng_init(struct svpy_rng *rng, const struct svpy_guest_memory *mem, int irqfd,
                  int error_fd, const int *kick_fds);
int svpy_rng_attach(struct svpy_rng *rng, struct svpy_iothread *thread);
void svpy_rng_configure(struct svpy_rng *rng, int source_fd, uint64_t max_bytes,
                        uint64_t period_ms);
void svpy_rng_start(struct svpy_rng *rng);
void svpy_rng_stop(struct svpy_rng *rng);
void svpy_rng_destroy(struct svpy_rng *rng);

#define SVPY_SANDBOX_OFF ...
#define SVPY_SANDBOX_ENFORCE ...
#define SVPY_SANDBOX_LOG ...
#define SVPY_THREAD_MAIN ...
#define SVPY_THREAD_VCPU ...
#define SVPY_THREAD_IO ...
#define SVPY_RULE_ANY ...
#define SVPY_RULE_THREADS_ONLY ...
#define SVPY_RULE_OWN_PROCESS ...
#define SVPY_RULE_ENOSYS ...
#define SVPY_RULE_EACCES ...
#define SVPY_RULE_NO_EXEC ...
#define SVPY_RULE_IOCTLS ...
struct svpy_syscall_rule {
    const char *name;
    unsigned kinds;
    unsigned condition;
    const char *why;
};
int svpy_sandbox_prepare(int mode, int log_fd);
int svpy_sandbox_enter(unsigned kind);
int svpy_sandbox_mode(void);
struct svpy_ioctl_rule {
    unsigned long request;
    const char *name;
    unsigned kinds;
    const char *why;
};
const struct svpy_syscall_rule *svpy_sandbox_rule(unsigned index);
const struct svpy_ioctl_rule *svpy_sandbox_ioctl(unsigned index);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "stratovirt_py._dataplane",
    '#include <sys/uio.h>\n#include "virtio_blk.h"\n#include "virtio_net.h"\n'
    '#include "virtio_balloon.h"\n'
    '#include "virtio_console.h"\n'
    '#include "virtio_rng.h"\n'
    '#include "vcpu_fastpath.h"\n'
    '#include "sandbox.h"\n',
    # setuptools insists on paths relative to the project root.
    sources=[os.path.relpath(DATAPLANE / name) for name in SOURCES],
    include_dirs=[os.path.relpath(DATAPLANE)],
    extra_compile_args=["-Wall", "-Wextra", "-O2", "-D_GNU_SOURCE"],
    libraries=["pthread", "seccomp"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(DATAPLANE.parent.parent / "build" / "cffi"), verbose=False)
