/* mem.c -- touch memory from C (see mem.h). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "mem.h"

uint64_t rs_mem_checksum(uint64_t addr, size_t len)
{
    const volatile uint8_t *p = (const volatile uint8_t *)(uintptr_t)addr;
    uint64_t sum = 0;

    for (size_t i = 0; i + 8 <= len; i += 8) {
        uint64_t w;

        memcpy(&w, (const void *)(p + i), 8);
        sum += w;
    }
    return sum;
}

void rs_mem_fill(uint64_t addr, size_t len, uint8_t byte)
{
    memset((void *)(uintptr_t)addr, byte, len);
}
