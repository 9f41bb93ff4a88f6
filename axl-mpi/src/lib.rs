//! The `*_comm` calls of AXL's `axl_mpi.h` over ferry: each is the serial call followed by one
//! logical-and agreement over the communicator, as in AXL, and returns 0 when every rank
//! succeeded, 1 otherwise (`AXL_Create_comm`: the id, or -1 on every rank). `AXL_Wait_comm`
//! goes further than AXL: every rank first waits until its files are durable, the ranks agree,
//! and only then does each commit — if any rank failed, no rank's files appear.
//!
//! MPI is called only here, in the caller's thread; the background copy threads never call it.
//! The agreement is an `MPI_Iallreduce` polled with 1 ms sleeps, so a rank that is done does not
//! spin a core its peers need to finish their copies.

#![allow(non_snake_case)]

use std::ffi::{c_char, c_int};

// The serial API, compiled into this library too (not linked from libaxl: each library is
// self-contained, as AXL's are, and carries its own SONAME).
#[path = "../../axl/src/lib.rs"]
pub mod axl;

use axl::{FAILURE, SUCCESS};
use mpi::ffi;

/// What the `*_comm` calls return on failure (AXL's `axl_mpi.c` redefines `AXL_FAILURE` as 1).
const COMM_FAILURE: c_int = 1;

fn complain(call: &str, msg: impl std::fmt::Display) {
    eprintln!("ferry-axl: {call}: {msg}");
}

/// Whether `ok` holds on every rank of `comm` (false, with a message, if MPI cannot tell).
fn all(call: &str, ok: bool, comm: ffi::MPI_Comm) -> bool {
    let mut init: c_int = 0;
    let mut fin: c_int = 0;
    // SAFETY: MPI_Initialized and MPI_Finalized may be called at any time.
    unsafe {
        ffi::MPI_Initialized(&mut init);
        ffi::MPI_Finalized(&mut fin);
    }
    if init == 0 || fin != 0 {
        complain(call, "MPI is not initialised (or already finalized)");
        return false;
    }
    let send: c_int = c_int::from(ok);
    let mut recv: c_int = 0;
    // SAFETY: an MPI request, written by MPI_Iallreduce before it is read.
    let mut req: ffi::MPI_Request = unsafe { std::mem::zeroed() };
    // SAFETY: one int each way, the datatype and op are MPI's own; `comm` is the caller's
    // communicator; the buffers live until the request completes below.
    let rc = unsafe {
        ffi::MPI_Iallreduce(
            &send as *const c_int as *const _,
            &mut recv as *mut c_int as *mut _,
            1,
            ffi::RSMPI_INT32_T,
            ffi::RSMPI_LAND,
            comm,
            &mut req,
        )
    };
    if rc != 0 {
        complain(call, format!("MPI_Iallreduce failed ({rc})"));
        return false;
    }
    let mut polls = 0u32;
    loop {
        let mut done: c_int = 0;
        // SAFETY: testing the request started above; status is ignored.
        let rc = unsafe { ffi::MPI_Test(&mut req, &mut done, ffi::RSMPI_STATUS_IGNORE) };
        if rc != 0 {
            complain(call, format!("MPI_Test failed ({rc})"));
            // The request may still write into `recv`: complete it before the buffers go.
            // SAFETY: the request started above; status ignored.
            unsafe { ffi::MPI_Wait(&mut req, ffi::RSMPI_STATUS_IGNORE) };
            return false;
        }
        if done != 0 {
            return recv != 0;
        }
        polls += 1;
        if polls > 20 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

fn comm_rc(call: &str, rc: c_int, comm: ffi::MPI_Comm) -> c_int {
    if all(call, rc == SUCCESS, comm) {
        SUCCESS
    } else {
        COMM_FAILURE
    }
}

/// `int AXL_Init_comm(MPI_Comm comm)`.
#[no_mangle]
pub extern "C" fn AXL_Init_comm(comm: ffi::MPI_Comm) -> c_int {
    let rc = axl::AXL_Init();
    let (mut init, mut fin, mut rank): (c_int, c_int, c_int) = (0, 0, -1);
    // SAFETY: MPI_Initialized/MPI_Finalized may be called at any time; MPI_Comm_rank of the
    // caller's communicator into a local int, only while MPI is up.
    unsafe {
        ffi::MPI_Initialized(&mut init);
        ffi::MPI_Finalized(&mut fin);
        if init != 0 && fin == 0 && ffi::MPI_Comm_rank(comm, &mut rank) == 0 {
            axl::set_rank(rank);
        }
    }
    comm_rc("AXL_Init_comm", rc, comm)
}

/// `int AXL_Finalize_comm(MPI_Comm comm)`.
#[no_mangle]
pub extern "C" fn AXL_Finalize_comm(comm: ffi::MPI_Comm) -> c_int {
    comm_rc("AXL_Finalize_comm", axl::AXL_Finalize(), comm)
}

/// `int AXL_Create_comm(axl_xfer_t type, const char* name, const char* file, MPI_Comm comm)`:
/// the id on every rank, or -1 on every rank (a rank that did create frees its id).
///
/// # Safety
/// `name` and `file` are NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn AXL_Create_comm(
    xtype: c_int,
    name: *const c_char,
    file: *const c_char,
    comm: ffi::MPI_Comm,
) -> c_int {
    // SAFETY: forwarded from the caller.
    let id = unsafe { axl::AXL_Create(xtype, name, file) };
    if all("AXL_Create_comm", id >= 0, comm) {
        return id;
    }
    if id >= 0 {
        axl::AXL_Free(id);
    }
    FAILURE
}

/// `int AXL_Add_comm(int id, int num, const char** src, const char** dst, MPI_Comm comm)`.
///
/// # Safety
/// `src` and `dst` are NULL or arrays of `num` NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn AXL_Add_comm(
    id: c_int,
    num: c_int,
    src: *const *const c_char,
    dst: *const *const c_char,
    comm: ffi::MPI_Comm,
) -> c_int {
    let mut rc = SUCCESS;
    if num < 0 || (num > 0 && (src.is_null() || dst.is_null())) {
        complain(
            "AXL_Add_comm",
            format!("id {id}: {num} files but a NULL list"),
        );
        rc = FAILURE;
    } else {
        for i in 0..num as usize {
            // SAFETY: both arrays hold `num` pointers.
            let (s, d) = unsafe { (*src.add(i), *dst.add(i)) };
            // SAFETY: forwarded from the caller.
            if unsafe { axl::AXL_Add(id, s, d) } != SUCCESS {
                rc = FAILURE;
                break;
            }
        }
    }
    comm_rc("AXL_Add_comm", rc, comm)
}

/// `int AXL_Dispatch_comm(int id, MPI_Comm comm)`.
#[no_mangle]
pub extern "C" fn AXL_Dispatch_comm(id: c_int, comm: ffi::MPI_Comm) -> c_int {
    comm_rc("AXL_Dispatch_comm", axl::AXL_Dispatch(id), comm)
}

/// `int AXL_Test_comm(int id, MPI_Comm comm)`: 0 when every rank's transfer has finished
/// (successfully or not), 1 while any rank's still copies.
#[no_mangle]
pub extern "C" fn AXL_Test_comm(id: c_int, comm: ffi::MPI_Comm) -> c_int {
    comm_rc("AXL_Test_comm", axl::test_quiet(id), comm)
}

/// `int AXL_Wait_comm(int id, MPI_Comm comm)`: commits on every rank only when every rank's
/// files are durable; 0 when all committed.
#[no_mangle]
pub extern "C" fn AXL_Wait_comm(id: c_int, comm: ffi::MPI_Comm) -> c_int {
    let ready = axl::wait_prepared(id) == SUCCESS;
    let all_ready = all("AXL_Wait_comm", ready, comm);
    let rc = axl::finish_wait(id, all_ready);
    comm_rc("AXL_Wait_comm", rc, comm)
}

/// `int AXL_Cancel_comm(int id, MPI_Comm comm)`.
#[no_mangle]
pub extern "C" fn AXL_Cancel_comm(id: c_int, comm: ffi::MPI_Comm) -> c_int {
    comm_rc("AXL_Cancel_comm", axl::AXL_Cancel(id), comm)
}

/// `int AXL_Free_comm(int id, MPI_Comm comm)`.
#[no_mangle]
pub extern "C" fn AXL_Free_comm(id: c_int, comm: ffi::MPI_Comm) -> c_int {
    comm_rc("AXL_Free_comm", axl::AXL_Free(id), comm)
}

/// `int AXL_Stop_comm(MPI_Comm comm)`.
#[no_mangle]
pub extern "C" fn AXL_Stop_comm(comm: ffi::MPI_Comm) -> c_int {
    comm_rc("AXL_Stop_comm", axl::AXL_Stop(), comm)
}
