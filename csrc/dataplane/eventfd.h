/* Signalling an eventfd, the data plane's one way to wake another thread. */
#ifndef SVPY_EVENTFD_H
#define SVPY_EVENTFD_H

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

static inline void svpy_eventfd_signal(int fd)
{
    uint64_t one = 1;

    /* EAGAIN means the counter is saturated: the event is pending anyway. */
    while (write(fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

#endif
