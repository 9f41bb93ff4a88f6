// AXL's shared library has an unversioned SONAME: an already-built SCR asks for `libaxl_mpi.so`
// and finds this one first on LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libaxl_mpi.so");
}
