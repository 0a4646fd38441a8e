/* mem.h -- touch memory from C (cdef: no macros, no includes). Built into
 * restore._testbed, not the engine.
 *
 * cffi releases the GIL around these calls, so a Python thread can fault on
 * userfaultfd-registered memory while another thread (or process) serves
 * the fault. Used by tests, the test guest and benchmarks.
 */

/* Sum of the little-endian 64-bit words of [addr, addr+len), modulo 2^64
 * (len a multiple of 8). Reading faults every page in on the way. numpy
 * computes the same with np.frombuffer(b, "<u8").sum(dtype=np.uint64). */
uint64_t rs_mem_checksum(uint64_t addr, size_t len);

/* Write byte to [addr, addr+len). */
void rs_mem_fill(uint64_t addr, size_t len, uint8_t byte);
