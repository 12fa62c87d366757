/* Polled 16550 UART driver: transmit and receive only, no initialisation. */
#include "serial.h"

#include "io.h"

#define UART_THR 0 /* write: transmit holding register */
#define UART_RBR 0 /* read: receive buffer */
#define UART_LSR 5 /* line status */
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20

/*
 * Each LSR read is a VM exit (~10 us here), so this bounds a stuck transmitter to a
 * few tens of milliseconds; after one timeout the guest stops polling and just writes.
 */
#define TX_POLL_LIMIT 4096

static bool tx_broken;

static void serial_put_raw(uint8_t byte)
{
    if (!tx_broken) {
        unsigned polls = 0;
        while (!(inb(SERIAL_PORT + UART_LSR) & LSR_THR_EMPTY)) {
            if (++polls >= TX_POLL_LIMIT) {
                tx_broken = true;
                break;
            }
        }
    }
    outb(byte, SERIAL_PORT + UART_THR);
}

void serial_putc(char c)
{
    if (c == '\n')
        serial_put_raw('\r');
    serial_put_raw((uint8_t)c);
}

void serial_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        serial_putc(s[i]);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

bool serial_try_getc(uint8_t *out)
{
    if (!(inb(SERIAL_PORT + UART_LSR) & LSR_DATA_READY))
        return false;
    *out = inb(SERIAL_PORT + UART_RBR);
    return true;
}

uint8_t serial_getc(void)
{
    uint8_t byte;
    while (!serial_try_getc(&byte))
        ;
    return byte;
}

bool serial_tx_broken(void)
{
    return tx_broken;
}
