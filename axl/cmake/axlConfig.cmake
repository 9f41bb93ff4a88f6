# axlConfig.cmake: ferry's AXL-compatible libraries, as `find_package(axl)` finds AXL's.
#
# Imported targets (the ones AXL v0.9.0 exports):
#   axl::axl             libaxl.so      serial API (axl.h)
#   axl::axl-static      libaxl.a
#   axl::axl_mpi         libaxl_mpi.so  serial + *_comm API (axl_mpi.h)
#   axl::axl_mpi-static  libaxl_mpi.a
# Unlike AXL's, they need neither KVTree nor zlib (ferry reads a caller's kvtree with the
# caller's own KVTree library); the static ones carry the system libraries Rust's runtime needs.

cmake_minimum_required(VERSION 3.14)
include(CMakeFindDependencyMacro)
find_dependency(Threads)
find_dependency(MPI COMPONENTS C)

get_filename_component(_axl_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(_axl_rt "Threads::Threads;dl;m;rt;util;gcc_s")

if(NOT TARGET axl::axl)
  add_library(axl::axl SHARED IMPORTED)
  set_target_properties(axl::axl PROPERTIES
    IMPORTED_LOCATION "${_axl_prefix}/lib/libaxl.so"
    IMPORTED_SONAME "libaxl.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_axl_prefix}/include"
    INTERFACE_LINK_LIBRARIES "Threads::Threads")

  add_library(axl::axl-static STATIC IMPORTED)
  set_target_properties(axl::axl-static PROPERTIES
    IMPORTED_LOCATION "${_axl_prefix}/lib/libaxl.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_axl_prefix}/include"
    INTERFACE_LINK_LIBRARIES "${_axl_rt}")

  add_library(axl::axl_mpi SHARED IMPORTED)
  set_target_properties(axl::axl_mpi PROPERTIES
    IMPORTED_LOCATION "${_axl_prefix}/lib/libaxl_mpi.so"
    IMPORTED_SONAME "libaxl_mpi.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_axl_prefix}/include"
    INTERFACE_LINK_LIBRARIES "Threads::Threads;MPI::MPI_C")

  add_library(axl::axl_mpi-static STATIC IMPORTED)
  set_target_properties(axl::axl_mpi-static PROPERTIES
    IMPORTED_LOCATION "${_axl_prefix}/lib/libaxl_mpi.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_axl_prefix}/include"
    INTERFACE_LINK_LIBRARIES "MPI::MPI_C;${_axl_rt}")
endif()

set(axl_FOUND TRUE)
unset(_axl_prefix)
unset(_axl_rt)
