/* Thin C helpers behind the cffi KVM bindings.
 *
 * ioctl() is variadic, which cffi can only call with explicitly typed
 * arguments; these wrappers give it fixed signatures and return -errno on
 * failure so that the error survives the trip back into Python without
 * depending on thread-local errno handling. */
#ifndef STRATOVIRT_PY_KVM_HELPERS_H
#define STRATOVIRT_PY_KVM_HELPERS_H

#include <stddef.h>
#include <stdint.h>

long svpy_ioctl_ptr(int fd, unsigned long request, void *arg);
long svpy_ioctl_int(int fd, unsigned long request, unsigned long arg);

/* Anonymous, lazily backed guest RAM. Returns NULL and sets *err on failure. */
void *svpy_map_guest_ram(size_t size, int dump_core, int *err);
int svpy_unmap(void *addr, size_t size);
int svpy_discard(void *addr, size_t size);

/* Installs a handler that does nothing for `signo`, without SA_RESTART, so a
 * signal sent to a vCPU thread makes its blocking KVM_RUN return EINTR. */
int svpy_install_kick_handler(int signo);

/* Runs CPUID on the host CPU: regs = {EAX, EBX, ECX, EDX} of leaf `function`,
 * subleaf `index`.  KVM_GET_SUPPORTED_CPUID zeroes some leaves that `-cpu host`
 * copies from the host (the brand string). */
void svpy_host_cpuid(uint32_t function, uint32_t index, uint32_t regs[4]);

#endif
