/* The monitor's seccomp allow-list: one filter per thread kind, built with libseccomp.
 *
 * svpy_sandbox_prepare() once, early (it installs the SIGSYS reporter); then each thread
 * calls svpy_sandbox_enter() with its kind once its own set-up is done. A thread created by
 * a filtered thread keeps its creator's filter (filters would stack if it entered another). */
#ifndef SVPY_SANDBOX_H
#define SVPY_SANDBOX_H

#define SVPY_SANDBOX_OFF 0
#define SVPY_SANDBOX_ENFORCE 1 /* a call outside the list: logged, then SIGSYS kills the process */
#define SVPY_SANDBOX_LOG 2     /* a call outside the list is allowed and logged by the kernel */

#define SVPY_THREAD_MAIN 1 /* the control plane: QMP, hot-plug, chardevs, helpers */
#define SVPY_THREAD_VCPU 2 /* KVM_RUN and the device models' exits */
#define SVPY_THREAD_IO 4   /* the C data plane's epoll loop */

/* How a rule narrows a call beyond its number. */
#define SVPY_RULE_ANY 0
#define SVPY_RULE_THREADS_ONLY 1  /* clone: only with CLONE_THREAD (no new process) */
#define SVPY_RULE_OWN_PROCESS 2   /* tgkill: only to threads of this process */
#define SVPY_RULE_ENOSYS 3        /* fails with ENOSYS, so glibc falls back to one allowed */
#define SVPY_RULE_EACCES 4        /* fails with EACCES: callers cope, nothing is opened */
#define SVPY_RULE_NO_EXEC 5       /* mmap/mprotect: never a new executable mapping */
#define SVPY_RULE_IOCTLS 6        /* ioctl: only the requests listed for the thread's kind */

struct svpy_syscall_rule {
    const char *name;
    unsigned kinds;     /* SVPY_THREAD_* bits */
    unsigned condition; /* SVPY_RULE_* */
    const char *why;
};

struct svpy_ioctl_rule {
    unsigned long request;
    const char *name;
    unsigned kinds;
    const char *why;
};

/* Sets the mode and log fd, resolves syscall names for the reporter and installs it.
 * Returns 0 or -errno (-EINVAL: a rule names a call this architecture does not have). */
int svpy_sandbox_prepare(int mode, int log_fd);
/* Loads the calling thread's filter for `kind`; 0 when the mode is OFF. 0 or -errno. */
int svpy_sandbox_enter(unsigned kind);
int svpy_sandbox_mode(void);
/* The allow-list, for documentation and tests: NULL past the end. */
const struct svpy_syscall_rule *svpy_sandbox_rule(unsigned index);
const struct svpy_ioctl_rule *svpy_sandbox_ioctl(unsigned index);

#endif
