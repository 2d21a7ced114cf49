# Debian's libcpp-httplib-dev ships a compiled library with a pkg-config file
# but no CMake package; this module turns it into the imported target
# httplib::httplib so that find_package(httplib) works like the others.
find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(PC_HTTPLIB QUIET cpp-httplib)
endif()
find_path(HTTPLIB_INCLUDE_DIR httplib.h HINTS ${PC_HTTPLIB_INCLUDE_DIRS})
find_library(HTTPLIB_LIBRARY NAMES cpp-httplib HINTS ${PC_HTTPLIB_LIBRARY_DIRS})
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(httplib REQUIRED_VARS HTTPLIB_LIBRARY HTTPLIB_INCLUDE_DIR)
if(httplib_FOUND AND NOT TARGET httplib::httplib)
  add_library(httplib::httplib UNKNOWN IMPORTED)
  set_target_properties(httplib::httplib PROPERTIES
    IMPORTED_LOCATION "${HTTPLIB_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${HTTPLIB_INCLUDE_DIR}")
  # The library was compiled with these switches; they change class layouts,
  # so every user must see the same ones (taken from the .pc file).
  if(PC_HTTPLIB_CFLAGS_OTHER)
    set_property(TARGET httplib::httplib PROPERTY INTERFACE_COMPILE_OPTIONS ${PC_HTTPLIB_CFLAGS_OTHER})
  else()
    set_property(TARGET httplib::httplib PROPERTY INTERFACE_COMPILE_DEFINITIONS CPPHTTPLIB_OPENSSL_SUPPORT CPPHTTPLIB_ZLIB_SUPPORT CPPHTTPLIB_BROTLI_SUPPORT)
  endif()
endif()
