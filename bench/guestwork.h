/* guestwork.h -- the work both freestanding guests do (minivm's guest and
 * the Firecracker guest, each one C file that includes this): state built
 * in guest memory, then requests answered from it.
 *
 * The state: records with keys and payloads, an open-addressing hash index
 * over the keys, and a "model" (rows of weights, half of them left zero,
 * as real memory has its zero pages). A request does data-dependent
 * lookups and arithmetic over all of it, so a restored guest that got any
 * byte wrong answers differently (or 0xdeadbeef when the index lost a key).
 */
#ifndef RESTORE_BENCH_GUESTWORK_H
#define RESTORE_BENCH_GUESTWORK_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long uptr;

#define RECORD_BYTES 64u
#define ROW_WORDS 256u
#define LOOKUPS 400u

struct record {
    u32 key;
    u32 payload[RECORD_BYTES / 4 - 1];
};

static u32 rnd(u32 *s)
{
    u32 x = *s;

    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static u32 key_of(u32 i)
{
    u32 k = i * 2654435761u ^ 0x5bd1e995u;

    k ^= k >> 15;
    return k | 1u; /* never 0: 0 marks an empty slot */
}

static struct record *records;
static u32 *table; /* 2n slots: record index + 1, or 0 */
static u32 *model; /* rows * ROW_WORDS weights */
static u32 n_records, n_slots, n_rows;

/* Build the state in the avail bytes from base: 4/10 of them records (and
 * their index after them), 3/10 the model. Returns the end of the state. */
static uptr build_state(uptr base, u32 avail)
{
    u32 s = 12345;

    n_records = avail / 10 * 4 / RECORD_BYTES;
    n_slots = 2 * n_records;
    records = (struct record *)base;
    table = (u32 *)(records + n_records);
    model = table + n_slots;
    n_rows = (avail / 10 * 3) / (ROW_WORDS * 4);

    for (u32 i = 0; i < n_records; i++) {
        records[i].key = key_of(i);
        for (u32 w = 0; w < RECORD_BYTES / 4 - 1; w++)
            records[i].payload[w] = rnd(&s);
    }
    for (u32 i = 0; i < n_records; i++) {
        u32 slot = records[i].key % n_slots;

        while (table[slot])
            slot = slot + 1 == n_slots ? 0 : slot + 1;
        table[slot] = i + 1;
    }
    for (u32 r = 0; r < n_rows; r += 2)
        for (u32 w = 0; w < ROW_WORDS; w++)
            model[r * ROW_WORDS + w] = rnd(&s) & 0xffff;
    return (uptr)(model + (u64)n_rows * ROW_WORDS);
}

static struct record *lookup(u32 key)
{
    u32 slot = key % n_slots;

    while (table[slot]) {
        struct record *r = &records[table[slot] - 1];

        if (r->key == key)
            return r;
        slot = slot + 1 == n_slots ? 0 : slot + 1;
    }
    return 0;
}

/* The answer to request req (any non-zero 32-bit number). */
static u32 invoke(u32 req)
{
    u32 s = req * 2654435761u ^ 0x9e3779b9u, acc = req;

    if (!s)
        s = 1;
    for (u32 q = 0; q < LOOKUPS; q++) {
        struct record *r = lookup(key_of(rnd(&s) % n_records));
        u32 row, dot = 0;

        if (!r)
            return 0xdeadbeefu; /* the index lost a key: state is wrong */
        acc ^= r->payload[rnd(&s) % (RECORD_BYTES / 4 - 1)];
        row = (acc ^ s) % n_rows;
        for (u32 k = 0; k < 64; k++)
            dot += model[row * ROW_WORDS + k * 4] * (k + 1);
        acc = ((acc << 5) | (acc >> 27)) + dot;
    }
    return acc;
}

#endif
