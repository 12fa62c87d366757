/* An I/O thread: epoll over device kick eventfds (ioeventfds), calling each
 * device's C handler without the GIL. */
#ifndef SVPY_IOTHREAD_H
#define SVPY_IOTHREAD_H

#include <pthread.h>
#include <stdint.h>

typedef void (*svpy_handler_fn)(void *context);

struct svpy_watch {
    int fd;
    svpy_handler_fn handler;
    void *context;
    uint32_t revents; /* the epoll events that woke the handler (EPOLLIN, EPOLLOUT...) */
};

struct svpy_iothread {
    int epoll_fd;
    int stop_fd;
    /* Signalled when the thread stops on its own (epoll_wait failed): from
     * then on no device it serves gets any work done, so the control plane
     * must hear of it.  failed_errno (atomic) says why; 0 while it runs;
     * failed_call names the call that failed (epoll_wait, or seccomp when the
     * thread could not load its filter). */
    int failure_fd;
    int32_t failed_errno;
    const char *failed_call;
    int running;
    pthread_t thread;
};

int svpy_iothread_start(struct svpy_iothread *thread);
/* The watch must stay valid until svpy_iothread_stop has returned. */
int svpy_iothread_watch(struct svpy_iothread *thread, struct svpy_watch *watch);
/* The same for other epoll events (a tap: EPOLLIN and/or EPOLLOUT); `events` may be 0. */
int svpy_iothread_watch_events(struct svpy_iothread *thread, struct svpy_watch *watch,
                               uint32_t events);
int svpy_iothread_modify(struct svpy_iothread *thread, struct svpy_watch *watch, uint32_t events);
/* After this the handler may still run once for an event fetched before it:
 * it must check that what it serves is still there. */
int svpy_iothread_unwatch(struct svpy_iothread *thread, struct svpy_watch *watch);
void svpy_iothread_stop(struct svpy_iothread *thread);

#endif
