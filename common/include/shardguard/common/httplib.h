// The one way to include cpp-httplib. Debian's libcpp-httplib is a compiled library
// built with OpenSSL, zlib and brotli support, and those switches change its class
// layouts, so every translation unit must see the same ones. They come from the
// httplib::httplib target (cmake/Findhttplib.cmake, taken from the library's .pc
// file); a file that includes this header from a target that does not link
// httplib::httplib stops here instead of breaking at run time.
#pragma once

#if !defined(CPPHTTPLIB_OPENSSL_SUPPORT) || !defined(CPPHTTPLIB_ZLIB_SUPPORT) || \
    !defined(CPPHTTPLIB_BROTLI_SUPPORT)
#error "link the target with httplib::httplib: it carries the CPPHTTPLIB_* definitions the library was built with"
#endif

#include <httplib.h>
