// AXL's shared library has an unversioned SONAME; an already-built program that needs
// `libaxl.so` finds this one through LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libaxl.so");
}
