#include "iothread.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "eventfd.h"
#include "sandbox.h"

#define MAX_EVENTS 32

static void *run(void *arg)
{
    struct svpy_iothread *thread = arg;
    struct epoll_event events[MAX_EVENTS];
    int ret = svpy_sandbox_enter(SVPY_THREAD_IO);

    if (ret < 0) {
        /* Serving guests unfiltered is not an option: the VM ends on this error. */
        thread->failed_call = "seccomp (loading the I/O thread's filter)";
        __atomic_store_n(&thread->failed_errno, -ret, __ATOMIC_SEQ_CST);
        svpy_eventfd_signal(thread->failure_fd);
        return NULL;
    }
    for (;;) {
        int count = epoll_wait(thread->epoll_fd, events, MAX_EVENTS, -1);

        if (count < 0) {
            if (errno == EINTR)
                continue;
            thread->failed_call = "epoll_wait";
            __atomic_store_n(&thread->failed_errno, errno ? errno : EIO, __ATOMIC_SEQ_CST);
            svpy_eventfd_signal(thread->failure_fd);
            return NULL;
        }
        for (int i = 0; i < count; i++) {
            struct svpy_watch *watch = events[i].data.ptr;

            if (!watch)
                return NULL; /* the stop eventfd */
            watch->revents = events[i].events;
            watch->handler(watch->context);
        }
    }
}

int svpy_iothread_start(struct svpy_iothread *thread)
{
    struct epoll_event event;
    int ret;

    memset(&event, 0, sizeof(event));
    thread->running = 0;
    thread->failed_errno = 0;
    thread->failed_call = "";
    thread->stop_fd = thread->failure_fd = -1;
    thread->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (thread->epoll_fd < 0)
        return -errno;
    thread->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    thread->failure_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (thread->stop_fd < 0 || thread->failure_fd < 0) {
        ret = -errno;
        goto fail;
    }
    event.events = EPOLLIN;
    event.data.ptr = NULL;
    if (epoll_ctl(thread->epoll_fd, EPOLL_CTL_ADD, thread->stop_fd, &event) < 0) {
        ret = -errno;
        goto fail;
    }
    ret = -pthread_create(&thread->thread, NULL, run, thread);
    if (ret)
        goto fail;
    pthread_setname_np(thread->thread, "iothread");
    thread->running = 1;
    return 0;
fail:
    if (thread->failure_fd >= 0)
        close(thread->failure_fd);
    if (thread->stop_fd >= 0)
        close(thread->stop_fd);
    close(thread->epoll_fd);
    return ret;
}

static int control(struct svpy_iothread *thread, int op, struct svpy_watch *watch,
                   uint32_t events)
{
    struct epoll_event event;

    memset(&event, 0, sizeof(event));
    event.events = events;
    event.data.ptr = watch;
    return epoll_ctl(thread->epoll_fd, op, watch->fd, &event) < 0 ? -errno : 0;
}

int svpy_iothread_watch(struct svpy_iothread *thread, struct svpy_watch *watch)
{
    return control(thread, EPOLL_CTL_ADD, watch, EPOLLIN);
}

int svpy_iothread_watch_events(struct svpy_iothread *thread, struct svpy_watch *watch,
                               uint32_t events)
{
    return control(thread, EPOLL_CTL_ADD, watch, events);
}

int svpy_iothread_modify(struct svpy_iothread *thread, struct svpy_watch *watch, uint32_t events)
{
    return control(thread, EPOLL_CTL_MOD, watch, events);
}

int svpy_iothread_unwatch(struct svpy_iothread *thread, struct svpy_watch *watch)
{
    return control(thread, EPOLL_CTL_DEL, watch, 0);
}

void svpy_iothread_stop(struct svpy_iothread *thread)
{
    uint64_t one = 1;

    if (!thread->running)
        return;
    if (write(thread->stop_fd, &one, sizeof(one)) < 0)
        return; /* cannot happen on a fresh eventfd; never join a thread we could not wake */
    pthread_join(thread->thread, NULL);
    thread->running = 0;
    close(thread->failure_fd);
    close(thread->stop_fd);
    close(thread->epoll_fd);
}
