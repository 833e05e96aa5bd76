# Finds xsimd (unversioned: its version file rejects other majors) and works
# around Debian 12's xsimd 8.1 package, whose exported target links a plain
# "xtl" without finding it: with no xtl target the link line gets -lxtl and
# fails. xtl is optional for xsimd (only for xtl::xcomplex), so when the real
# package is absent an empty stand-in target satisfies the name.
find_package(xsimd REQUIRED)
if(NOT TARGET xtl)
  get_target_property(_mesaopt_xsimd_links xsimd INTERFACE_LINK_LIBRARIES)
  if(_mesaopt_xsimd_links MATCHES "(^|;)xtl(;|$)")
    find_package(xtl QUIET)
    if(NOT TARGET xtl)
      add_library(xtl INTERFACE IMPORTED)
    endif()
  endif()
  unset(_mesaopt_xsimd_links)
endif()
