/*
 * 16550 UART at I/O port 0x3f8, polled (the guest never enables interrupts).
 */
#ifndef SVTEST_SERIAL_H
#define SVTEST_SERIAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SERIAL_PORT 0x3f8

/* Writes one byte, "\n" as "\r\n". */
void serial_putc(char c);
void serial_write(const char *s, size_t n);
void serial_puts(const char *s);

/* Returns true and the byte when one is waiting (LSR bit 0), without blocking. */
bool serial_try_getc(uint8_t *out);
/* Waits for a byte. */
uint8_t serial_getc(void);

/* True once a transmit poll gave up: the UART never reported THR empty. */
bool serial_tx_broken(void);

#endif
