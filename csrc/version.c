#include "version.h"

#ifndef RS_PKG_VERSION
#error "RS_PKG_VERSION must be set by the build (restore/_version.py)"
#endif

const char *rs_version(void)
{
    return RS_PKG_VERSION;
}
