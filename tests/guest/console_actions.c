/*
 * The `console` action (README.md, "virtio-console actions"): the multiport
 * handshake with the first virtio-console device, then an echo on its ports.
 *
 *   svtest: console ready device=N max-ports=N accepted=0x...
 *   svtest: console port-add id=N            (answered with PORT_READY 1)
 *   svtest: console console-port id=N        (answered with PORT_OPEN 1; port 0 then
 *                                             gets "svtest-console hello")
 *   svtest: console port-name id=N name=S
 *   svtest: console port-open id=N value=V   (host side connected or not; when port 0's
 *                                             goes, "svtest-console while-away K" is written
 *                                             there, for the next client)
 *   svtest: console rx port=N len=L
 * Each line a port receives comes back as "echo: <line>"; "quit" ends the run
 * ("console done ..."), as does svtest.timeout_ms (default 300000) with FAIL.
 */
#include "actions.h"
#include "blk_actions.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "guestmem.h"
#include "printf.h"
#include "string.h"
#include "tsc.h"
#include "virtio_console.h"
#include "virtio_mmio.h"
#include "virtqueue.h"

#define CON_QUEUES 6 /* port 0, control, port 1 */
#define CON_QSIZE 16
#define CON_BUF 128
#define CTRL_RX 2
#define CTRL_TX 3
#define LINE_MAX 120

static uint8_t rings[CON_QUEUES][VQ_PAGE_SIZE] __attribute__((aligned(4096))) NOINIT;
static uint8_t bufs[CON_QUEUES][CON_QSIZE][CON_BUF] __attribute__((aligned(64))) NOINIT;
static struct virtq vqs[CON_QUEUES];
static const struct virtio_mmio_dev *dev;
static unsigned queues, timeout_ms;
static char lines[2][LINE_MAX + 1];
static unsigned line_len[2];

static const char action[] = "console";

static NORETURN void fail(const char *why)
{
    report("%s FAIL %s", action, why);
    finish();
}

static int find_console(void)
{
    unsigned tokens = virtio_devices_discover();
    for (unsigned i = 0; i < tokens && i < VIRTIO_MMIO_MAX_DEVICES; i++) {
        const struct virtio_mmio_dev *d = &virtio_devs[i];
        if (d->parsed && vm_read(d, VIRTIO_MMIO_MAGIC) == VIRTIO_MMIO_MAGIC_VALUE &&
            vm_read(d, VIRTIO_MMIO_DEVICE_ID) == VIRTIO_ID_CONSOLE)
            return (int)i;
    }
    return -1;
}

static void kick(unsigned q)
{
    if (vq_kick_needed(&vqs[q]))
        vm_notify(dev, q);
}

/* Every free descriptor of a receive queue becomes one device-writable buffer. */
static void post_rx(unsigned q)
{
    struct virtq *vq = &vqs[q];
    while (vq->num_free) {
        uint16_t head = vq->free_head; /* one descriptor per chain: index = buffer */
        struct vq_buf buf = { (uintptr_t)bufs[q][head], CON_BUF, true };
        int added = vq_add(vq, &buf, 1, NULL);
        if (added < 0)
            break;
        vq_publish(vq, (uint16_t)added);
    }
    kick(q);
}

/* Sends len bytes on transmit queue q and waits until the device used them. */
static void send(unsigned q, const void *data, unsigned len)
{
    struct virtq *vq = &vqs[q];
    const uint8_t *bytes = data;
    while (len) {
        unsigned chunk = len < CON_BUF ? len : CON_BUF;
        uint16_t head = vq->free_head;
        memcpy(bufs[q][head], bytes, chunk);
        struct vq_buf buf = { (uintptr_t)bufs[q][head], chunk, false };
        int added = vq_add(vq, &buf, 1, NULL);
        if (added < 0)
            fail("tx-full");
        vq_publish(vq, (uint16_t)added);
        kick(q);
        uint64_t deadline = tsc_deadline_ms(5000);
        uint32_t id, used_len;
        while (!vq_pop_used(vq, &id, &used_len)) {
            if (tsc_passed(deadline))
                fail(q == CTRL_TX ? "control-tx-timeout" : "tx-timeout");
            cpu_relax();
        }
        vq_free(vq, (uint16_t)id);
        bytes += chunk;
        len -= chunk;
    }
}

static void send_ctrl(uint32_t id, uint16_t event, uint16_t value)
{
    uint8_t msg[8] = { (uint8_t)id, (uint8_t)(id >> 8), (uint8_t)(id >> 16), (uint8_t)(id >> 24),
                       (uint8_t)event, (uint8_t)(event >> 8), (uint8_t)value,
                       (uint8_t)(value >> 8) };
    send(CTRL_TX, msg, sizeof(msg));
}

static unsigned tx_queue(unsigned port)
{
    return port == 0 ? 1 : 5;
}

static void say(unsigned port, const char *text)
{
    send(tx_queue(port), text, (unsigned)strlen(text));
}

static void handle_control(const uint8_t *msg, uint32_t len, unsigned *away)
{
    if (len < 8)
        fail("short-control-message");
    uint32_t id = msg[0] | msg[1] << 8 | msg[2] << 16 | (uint32_t)msg[3] << 24;
    uint16_t event = (uint16_t)(msg[4] | msg[5] << 8), value = (uint16_t)(msg[6] | msg[7] << 8);
    switch (event) {
    case VIRTIO_CONSOLE_PORT_ADD:
        report("%s port-add id=%u", action, id);
        send_ctrl(id, VIRTIO_CONSOLE_PORT_READY, id < 2 ? 1 : 0); /* queues for ports 0, 1 */
        break;
    case VIRTIO_CONSOLE_CONSOLE_PORT:
        report("%s console-port id=%u", action, id);
        send_ctrl(id, VIRTIO_CONSOLE_PORT_OPEN, 1); /* as Linux opens hvc0 */
        if (id == 0)
            say(0, "svtest-console hello\n");
        break;
    case VIRTIO_CONSOLE_PORT_NAME: {
        char name[CON_BUF];
        uint32_t n = len - 8 < sizeof(name) - 1 ? len - 8 : sizeof(name) - 1;
        memcpy(name, msg + 8, n);
        name[n] = 0;
        report("%s port-name id=%u name=%s", action, id, name);
        break;
    }
    case VIRTIO_CONSOLE_PORT_OPEN:
        report("%s port-open id=%u value=%u", action, id, value);
        if (id < 2 && value) /* a serial port is opened once the host is there */
            send_ctrl(id, VIRTIO_CONSOLE_PORT_OPEN, 1);
        if (id == 0 && !value) {
            char text[64];
            ksnprintf(text, sizeof(text), "svtest-console while-away %u\n", ++*away);
            say(0, text);
        }
        break;
    default:
        report("%s control id=%u event=%u value=%u", action, id, event, value);
    }
}

/* Input on port: echoed line by line; true once "quit" came. */
static bool handle_input(unsigned port, const uint8_t *data, uint32_t len, unsigned *echoed)
{
    report("%s rx port=%u len=%u", action, port, len);
    for (uint32_t i = 0; i < len; i++) {
        char c = (char)data[i];
        if (c == '\r')
            continue;
        if (c != '\n') {
            if (line_len[port] < LINE_MAX)
                lines[port][line_len[port]++] = c;
            continue;
        }
        lines[port][line_len[port]] = 0;
        line_len[port] = 0;
        if (!strcmp(lines[port], "quit"))
            return true;
        char text[LINE_MAX + 16];
        ksnprintf(text, sizeof(text), "echo: %s\n", lines[port]);
        say(port, text);
        (*echoed)++;
    }
    return false;
}

void action_console(void)
{
    const char *cl = boot_info.cmdline;
    timeout_ms = (unsigned)cmdline_get_u64(cl, "svtest.timeout_ms", 300000);
    int index = find_console();
    if (index < 0)
        fail("init=no-device");
    dev = &virtio_devs[index];
    const char *why = vm_init_begin(dev, VIRTIO_ID_CONSOLE, "console", 200);
    if (why)
        fail(why);
    uint64_t offered = vm_device_features(dev);
    if (!(offered & VIRTIO_BIT(VIRTIO_F_VERSION_1)) ||
        !(offered & VIRTIO_BIT(VIRTIO_CONSOLE_F_MULTIPORT)))
        fail("init=no-multiport");
    uint64_t accepted = VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_CONSOLE_F_MULTIPORT);
    why = vm_init_features(dev, accepted);
    if (why)
        fail(why);
    uint32_t max_ports = vm_config32(dev, VIRTIO_CONSOLE_CFG_MAX_NR_PORTS);
    queues = max_ports >= 2 ? 6 : 4;
    for (unsigned q = 0; q < queues; q++) {
        vm_write(dev, VIRTIO_MMIO_QUEUE_SEL, q);
        uint16_t max = (uint16_t)vm_read(dev, VIRTIO_MMIO_QUEUE_NUM_MAX);
        uint16_t num = max && max < CON_QSIZE ? max : CON_QSIZE;
        vq_init(&vqs[q], rings[q], num, false);
        why = vm_setup_queue(dev, q, num, vq_desc_addr(&vqs[q]), vq_driver_addr(&vqs[q]),
                             vq_device_addr(&vqs[q]));
        if (why)
            fail(vm_init_fail(dev, why));
    }
    why = vm_init_driver_ok(dev);
    if (why)
        fail(why);
    report("%s ready device=%d max-ports=%u accepted=0x%lx", action, index, max_ports,
           accepted);
    for (unsigned q = 0; q < queues; q += 2)
        post_rx(q); /* 0, 2 and 4: every receive queue */
    send_ctrl(0, VIRTIO_CONSOLE_DEVICE_READY, 1);

    unsigned away = 0, echoed = 0;
    uint64_t deadline = tsc_deadline_ms(timeout_ms);
    for (;;) {
        uint32_t id, len;
        for (unsigned q = 0; q < queues; q += 2) {
            bool any = false;
            while (vq_pop_used(&vqs[q], &id, &len)) {
                any = true;
                if (len > CON_BUF)
                    fail("used-length-too-long");
                bool quit = false;
                if (q == CTRL_RX)
                    handle_control(bufs[q][id], len, &away);
                else
                    quit = handle_input(q == 0 ? 0 : 1, bufs[q][id], len, &echoed);
                vq_free(&vqs[q], (uint16_t)id);
                if (quit) {
                    report("%s done echoed=%u away=%u", action, echoed, away);
                    finish();
                }
            }
            if (any)
                post_rx(q);
        }
        vm_ack_interrupts(dev);
        if (tsc_passed(deadline))
            fail("timeout");
        cpu_relax();
    }
}
