/* Shared part of the data plane's libFuzzer targets.
 *
 * Synthetic guest memory: a few regions, each its own mapping with PROT_NONE
 * guard pages on both sides, with gaps between them in guest-physical space
 * (one region ends exactly at 2^64).  A fuzz input is a small program a
 * hostile driver runs against it: write descriptors, rings and buffers, move
 * the available index, kick queues, and device-specific steps (a frame on
 * the tap, host console input...).  The device's queue calls go through
 * checking wrappers (wrap.h) that hold it to what a device may do: pop only
 * while not broken, answer only chains it holds, never say it wrote more
 * than a chain's writable bytes, and (checked at the end against a shadow
 * copy of what the guest wrote) write guest memory only in writable buffers
 * and used rings. */
#ifndef FUZZ_HARNESS_H
#define FUZZ_HARNESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "guest_memory.h"
#include "virtio_device.h"
#include "virtqueue.h"

#define H_MAX_QUEUES 8

struct h_reader {
    const uint8_t *data;
    size_t size;
    size_t pos;
};

uint8_t h_u8(struct h_reader *r);
uint16_t h_u16(struct h_reader *r);
uint32_t h_u32(struct h_reader *r);
uint64_t h_u64(struct h_reader *r);
bool h_more(const struct h_reader *r);
/* Up to `want` bytes of the input from here on; returns how many. */
size_t h_take(struct h_reader *r, const uint8_t **out, size_t want);

/* An invariant broken: prints why and aborts (libFuzzer saves the input). */
#define H_CHECK(cond, ...)                                                              \
    do {                                                                                \
        if (!(cond))                                                                    \
            h_fail(__FILE__, __LINE__, #cond, __VA_ARGS__);                             \
    } while (0)
void h_fail(const char *file, int line, const char *cond, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 4, 5)));

/* What a target tells the harness about its device. */
struct h_device {
    unsigned num_queues;
    unsigned num_ops; /* device-specific operations */
    struct svpy_virtqueue *(*queue)(unsigned q);
    int32_t *broken;
    /* Reads the device's configuration from the input and (re)initialises it;
     * the harness then activates the queues and calls start. */
    void (*begin)(struct h_reader *r);
    void (*start)(void);
    /* The driver resets the device (before a queue is set up anew). */
    void (*reset)(void);
    /* The guest notified queue q: what the I/O thread runs. */
    void (*notify)(unsigned q);
    void (*op)(unsigned code, struct h_reader *r);
    /* After the last step: finish what is in flight, release backends. */
    void (*end)(void);
    /* Optional: queue q was (re)activated. */
    void (*activated)(unsigned q);
};

extern struct svpy_guest_memory h_mem;

/* Runs one input against the device. */
void h_run(const struct h_device *dev, const uint8_t *data, size_t size);

/* Guest-side writes (the driver's), mirrored into the shadow copy. */
void h_guest_write(uint64_t gpa, const void *src, size_t len);
/* A guest-physical address from 3 input bytes: a region and an offset into
 * it (possibly past its end), or just below a region (a gap, or a wrap). */
uint64_t h_gpa(struct h_reader *r);
/* Faults the input asks a target to inject into its backend calls (an
 * EAGAIN from the tap, an error from a console backend): one bit each. */
extern uint32_t h_faults;
bool h_fault(unsigned bit);

/* Whether [ptr, ptr+len) lies wholly inside one region's host mapping. */
bool h_in_guest(const void *ptr, size_t len);
/* The host range may be changed by the device (balloon page release). */
void h_allow_write(const void *ptr, size_t len);

/* The checking wrappers that wrap.h renames the device's calls to. */
int harness_vq_pop(struct svpy_virtqueue *vq, const struct svpy_guest_memory *mem,
                   struct svpy_chain *chain);
void harness_vq_push(struct svpy_virtqueue *vq, uint16_t head, uint32_t written);
void harness_vq_unpop(struct svpy_virtqueue *vq, uint16_t count);
void harness_vq_fill(struct svpy_virtqueue *vq, uint16_t offset, uint16_t head,
                     uint32_t written);
void harness_vq_flush(struct svpy_virtqueue *vq, uint16_t count);
void harness_device_requeue(struct svpy_device *dev, unsigned queue);
int harness_madvise(void *addr, size_t len, int advice);

/* Pending re-queues (svpy_device_requeue) the harness serves like the I/O thread. */
extern uint32_t h_requeued;

/* Forgets every popped chain (a device reset drops what it held). */
void h_forget_chains(void);

#endif
