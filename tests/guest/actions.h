/*
 * What the guest does after its boot report, chosen by svtest.action= on the
 * command line.  Each action ends the run itself (reset, fault, halt or loop).
 * New test drivers (virtio-mmio block/net, hostile guest) add an entry to the
 * table in main.c and a function here or in their own file.
 */
#ifndef SVTEST_ACTIONS_H
#define SVTEST_ACTIONS_H

#define NORETURN __attribute__((noreturn))

/* Prints "svtest: done" and resets. */
NORETURN void finish(void);

NORETURN void action_reboot(void);
NORETURN void action_triple_fault(void);
NORETURN void action_halt_loop(void);
NORETURN void action_spin(void);
NORETURN void action_echo(void);
NORETURN void action_bad_mmio_write(void);
NORETURN void action_bad_mmio_read(void);
NORETURN void action_popcnt(void);
NORETURN void action_selftest(void); /* selftest.c */

/* virtio-mmio / virtio-blk (README.md, "virtio actions") */
NORETURN void action_virtio_info(void);        /* virtio_info.c */
NORETURN void action_blk_rw(void);             /* blk_rw.c */
NORETURN void action_blk_write_pattern(void);  /* blk_actions.c */
NORETURN void action_blk_read_pattern(void);   /* blk_actions.c */
NORETURN void action_blk_read_hex(void);       /* blk_actions.c */
NORETURN void action_blk_ro_check(void);       /* blk_actions.c */
NORETURN void action_blk_watch(void);          /* blk_actions.c */
NORETURN void action_blk_bench(void);          /* blk_bench.c */
NORETURN void action_hostile(void);            /* hostile.c */

/* virtio-net (README.md, "virtio-net actions") */
NORETURN void action_net_info(void);           /* net_actions.c */
NORETURN void action_net_send(void);           /* net_actions.c */
NORETURN void action_net_recv(void);           /* net_actions.c */
NORETURN void action_net_echo(void);           /* net_actions.c */
NORETURN void action_net_watch(void);          /* net_actions.c */
NORETURN void action_net_bench(void);          /* net_bench.c */
NORETURN void action_net_hostile(void);        /* net_hostile.c */

/* virtio-balloon (README.md, "virtio-balloon actions") */
NORETURN void action_balloon(void);            /* balloon_actions.c */
NORETURN void action_balloon_hostile(void);    /* balloon_hostile.c */

/* virtio-console (README.md, "virtio-console actions") */
NORETURN void action_console(void);            /* console_actions.c */
/* virtio-rng (README.md, "virtio-rng action") */
NORETURN void action_rng(void);                /* rng_actions.c */
NORETURN void action_rng_hostile(void);        /* rng_actions.c */

#endif
