/* Included by a target right before a device's .c file: the device's queue
 * calls, re-queues and page advice go through the harness's checking
 * wrappers (harness.c), the production code unchanged.  System headers the
 * device uses must be included before this, so that only its calls are renamed. */
#ifndef FUZZ_WRAP_H
#define FUZZ_WRAP_H

#include "harness.h"

#define svpy_vq_pop harness_vq_pop
#define svpy_vq_push harness_vq_push
#define svpy_vq_unpop harness_vq_unpop
#define svpy_vq_fill harness_vq_fill
#define svpy_vq_flush harness_vq_flush
#define svpy_device_requeue harness_device_requeue
#define madvise harness_madvise

#endif
