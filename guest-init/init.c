/*
 * PID 1 of the stratovirt-py test guest (initramfs /init and ext4 /sbin/init).
 *
 * Built as a static 32-bit i386 program without libc, SSE or MMX, making its
 * system calls with INT $0x80 (see scripts/build-guest-rootfs): on KVM hosts
 * whose hypervisor emulates guest kernel code (kvm_pvm) only that path works,
 * with the kernel patch in kernel-configs/patches/ and vdso32=0. On VMX/SVM
 * KVM it is an ordinary 32-bit program.
 *
 * It mounts /proc, /sys and /dev, moves to /dev/hvcN when the kernel's console
 * is a virtio console (console=hvcN), prints the marker line that tests wait for,
 * then runs a shell on the console (/bin/sh, busybox) and reboots the guest
 * (which ends the VM) when the shell exits. Without a shell it stays alive,
 * so that the kernel keeps serving the devices.
 */

#define NR_exit 1
#define NR_read 3
#define NR_nanosleep 162
#define NR_fork 2
#define NR_write 4
#define NR_open 5
#define NR_close 6
#define NR_waitpid 7
#define NR_execve 11
#define NR_mount 21
#define NR_access 33
#define NR_mkdir 39
#define NR_dup2 63
#define NR_setsid 66
#define NR_reboot 88
#define NR_ioctl 54
#define NR_pause 29
#define NR_sync 36

#define O_RDWR 2
#define EBUSY 16
#define EEXIST 17
#define TIOCSCTTY 0x540E
#define X_OK 1

#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_RESTART 0x01234567

static long syscall5(long nr, long a, long b, long c, long d, long e)
{
	long ret;

	__asm__ volatile("int $0x80"
			 : "=a"(ret)
			 : "a"(nr), "b"(a), "c"(b), "d"(c), "S"(d), "D"(e)
			 : "memory");
	return ret;
}

#define sys0(nr) syscall5(nr, 0, 0, 0, 0, 0)
#define sys1(nr, a) syscall5(nr, (long)(a), 0, 0, 0, 0)
#define sys2(nr, a, b) syscall5(nr, (long)(a), (long)(b), 0, 0, 0)
#define sys3(nr, a, b, c) syscall5(nr, (long)(a), (long)(b), (long)(c), 0, 0)

static unsigned long length(const char *s)
{
	unsigned long n = 0;

	while (s[n])
		n++;
	return n;
}

static void say(const char *s)
{
	sys3(NR_write, 1, s, length(s));
}

static void say_error(const char *what, long err)
{
	char num[12];
	int i = sizeof(num) - 1;
	unsigned long v = -err;

	num[i] = 0;
	do {
		num[--i] = '0' + v % 10;
		v /= 10;
	} while (v && i > 0);
	say("stratovirt-py guest: ");
	say(what);
	say(" failed, errno ");
	say(num + i);
	say("\n");
}

static void mount_fs(const char *type, const char *dir)
{
	long err;

	sys2(NR_mkdir, dir, 0755);
	err = syscall5(NR_mount, (long)type, (long)dir, (long)type, 0, 0);
	/* The kernel mounts devtmpfs on /dev itself for a disk root. */
	if (err < 0 && err != -EBUSY)
		say_error(dir, err);
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

/* The last console= of the kernel command line, when it names hvcN: "/dev/hvcN"
 * in path (else path is left empty). */
static void hvc_console(char *path, unsigned long size)
{
	static char cmdline[2048];
	const char *value = 0;
	long fd, n;
	unsigned long i, j;

	path[0] = 0;
	fd = sys2(NR_open, "/proc/cmdline", 0);
	if (fd < 0)
		return;
	n = sys3(NR_read, fd, cmdline, sizeof(cmdline) - 1);
	sys1(NR_close, fd);
	if (n <= 0)
		return;
	cmdline[n] = 0;
	for (i = 0; cmdline[i]; i++)
		if ((i == 0 || cmdline[i - 1] == ' ') && starts_with(cmdline + i, "console="))
			value = cmdline + i + 8;
	if (!value || !starts_with(value, "hvc"))
		return;
	for (i = 0; "/dev/"[i]; i++)
		path[i] = "/dev/"[i];
	for (j = 0; value[j] && value[j] != ' ' && value[j] != ',' && value[j] != '\n' &&
		    i < size - 1; j++)
		path[i++] = value[j];
	path[i] = 0;
}

/* With console=hvcN the shell and the marker go to /dev/hvcN itself: the
 * kernel's /dev/console may have been opened (or failed to open) before the
 * virtio console's ports came up, which happens asynchronously. */
static void use_hvc_console(void)
{
	static const long tenth[2] = { 0, 100000000 }; /* 100 ms */
	char path[32];
	long fd = -1;
	int tries;

	hvc_console(path, sizeof(path));
	if (!path[0])
		return;
	for (tries = 0; tries < 600; tries++) { /* up to a minute: every fork is slow here */
		fd = sys2(NR_open, path, O_RDWR);
		if (fd >= 0)
			break;
		sys2(NR_nanosleep, tenth, 0);
	}
	if (fd < 0) {
		say_error(path, fd);
		return;
	}
	for (int i = 0; i < 3; i++)
		if (fd != i)
			sys2(NR_dup2, fd, i);
	if (fd > 2)
		sys1(NR_close, fd);
}

static void run_shell(char **envp)
{
	static char *const argv[] = { "-sh", 0 };
	long pid, err;
	int status;

	pid = sys0(NR_fork);
	if (pid < 0) {
		say_error("fork", pid);
		return;
	}
	if (pid == 0) {
		/* New session with the console as controlling tty: job control, ^C. */
		sys0(NR_setsid);
		sys3(NR_ioctl, 0, TIOCSCTTY, 1);
		err = sys3(NR_execve, "/bin/sh", argv, envp);
		say_error("execve /bin/sh", err);
		sys1(NR_exit, 127);
	}
	while (sys3(NR_waitpid, -1, &status, 0) != pid)
		;
}

int main(int argc, char **argv, char **envp)
{
	(void)argc;
	(void)argv;

	mount_fs("proc", "/proc");
	mount_fs("sysfs", "/sys");
	mount_fs("devtmpfs", "/dev");
	use_hvc_console();
	say("stratovirt-py guest: user space ready\n");

	if (sys2(NR_access, "/bin/sh", X_OK) == 0) {
		run_shell(envp);
		say("stratovirt-py guest: shell exited, rebooting\n");
		sys0(NR_sync);
		sys3(NR_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
		     LINUX_REBOOT_CMD_RESTART);
	}
	/* No shell: stay alive (PID 1 must not exit). */
	for (;;)
		sys0(NR_pause);
}

/* Entry point: the stack holds argc, argv[], 0, envp[], 0. */
__asm__(".globl _start\n"
	"_start:\n"
	"	xorl %ebp, %ebp\n"
	"	movl (%esp), %eax\n"		/* argc */
	"	leal 4(%esp), %ebx\n"		/* argv */
	"	leal 8(%esp,%eax,4), %ecx\n"	/* envp */
	"	andl $-16, %esp\n"
	"	subl $4, %esp\n"
	"	pushl %ecx\n"
	"	pushl %ebx\n"
	"	pushl %eax\n"
	"	call main\n"
	"	movl %eax, %ebx\n"
	"	movl $1, %eax\n"
	"	int $0x80\n");
