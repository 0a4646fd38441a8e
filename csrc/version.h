/* version.h -- the version of the compiled C core (cdef, no includes); both
 * extensions, restore._engine and restore._testbed, carry it. */

/* The package version this core was built for, compared with the Python
 * package's at import so a stale build is caught at once. */
const char *rs_version(void);
