/* faultlog.h -- the record of first touches (cdef: no macros, no includes).
 *
 * One record per first touch of a guest page in a restore session, written
 * by the engine's threads into a fixed ring without locks and read out at
 * session end (Python turns it into a numpy structured array; the layout
 * below is that array's dtype, 32 bytes a record, little-endian):
 *
 *   offset  0  uint64 t_ns        ns from session start to the fault's arrival
 *   offset  8  uint64 offset      file offset of the guest page, bytes
 *   offset 16  uint32 chunk       chunk holding the page; 0xFFFFFFFF: none
 *   offset 20  uint32 service_ns  ns from arrival to install (saturates)
 *   offset 24  uint8  source      RS_SRC_*
 *   offset 25  uint8  pad[7]
 *
 * The ring never overwrites: when full, further records are counted as
 * dropped. Capacity is chosen at creation (one per guest page suffices).
 */

enum {
    RS_SRC_ZERO = 0,       /* an all-zero page: UFFDIO_ZEROPAGE, no fetch */
    RS_SRC_L1 = 1,         /* from a chunk decoded out of the L1 cache */
    RS_SRC_FETCHED = 2,    /* from a fetched chunk, tier unknown (logs of
                              format 1.0; no longer written) */
    RS_SRC_REMOVED = 3,    /* the range was removed (balloon): zeros */
    RS_SRC_PREFETCHED = 4, /* installed ahead of the touch by a prefetch */
    RS_SRC_FAILED = 5,     /* the chunk could not be had: poisoned */
    RS_SRC_L2 = 6,         /* from a chunk the memcached L2 supplied */
    RS_SRC_DURABLE = 7,    /* from a chunk the durable store supplied */
    RS_SRC_HOST = 8,       /* from the host cache: decoded by an earlier
                              session or another process on this host */
    RS_N_SOURCES = 9
};

typedef struct rs_fault_record {
    uint64_t t_ns;
    uint64_t offset;
    uint32_t chunk;
    uint32_t service_ns;
    uint8_t source;
    uint8_t pad[7];
} rs_fault_record;

typedef struct rs_faultlog rs_faultlog;

int rs_faultlog_create(rs_faultlog **out, size_t capacity);
void rs_faultlog_destroy(rs_faultlog *log);

/* Append one record (thread-safe, lock-free); -ENOSPC when full. */
int rs_faultlog_append(rs_faultlog *log, const rs_fault_record *rec);

/* Records committed so far, and records dropped because the ring was full. */
size_t rs_faultlog_count(const rs_faultlog *log);
uint64_t rs_faultlog_dropped(const rs_faultlog *log);

/* Copy up to max committed records, in append order, to out; returns how
 * many. Safe while writers run (records still being written are left out). */
size_t rs_faultlog_copy(const rs_faultlog *log, rs_fault_record *out, size_t max);
