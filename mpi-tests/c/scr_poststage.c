/* SCR's post-stage pattern through ferry's libaxl_mpi: every rank flushes its checkpoint file into
 * one directory (ckpt.N/) as a SYNC transfer with a state file of its own
 * (STATE_DIR/rank_%d.state_file); `restart` is the next job, which reopens each rank's transfer
 * whose state file is still there (a completed one freed it) from it, resumes it and waits.
 *
 *   scr_poststage flush CACHE PFS STATE_DIR     (SCR_POSTSTAGE_KILL_RANK=r: rank r dies after its
 *                                                 dispatch, before its wait, taking the job down)
 *   scr_poststage restart STATE_DIR
 */
#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "axl.h"

int main(int argc, char** argv)
{
    MPI_Init(&argc, &argv);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (argc < 3 || AXL_Init() != AXL_SUCCESS) {
        fprintf(stderr, "usage: scr_poststage flush CACHE PFS STATE_DIR | restart STATE_DIR\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int flush = strcmp(argv[1], "flush") == 0;
    const char* state_dir = flush ? argv[4] : argv[2];
    char state[4096];
    snprintf(state, sizeof state, "%s/rank_%d.state_file", state_dir, rank);
    int rc = 0;
    if (flush) {
        char src[4096], dst[4096];
        snprintf(src, sizeof src, "%s/rank%d.ckpt", argv[2], rank);
        snprintf(dst, sizeof dst, "%s/rank%d.ckpt", argv[3], rank);
        int id = AXL_Create(AXL_XFER_SYNC, "ckpt.1", state);
        if (id < 0 || AXL_Add(id, src, dst) != AXL_SUCCESS || AXL_Dispatch(id) != AXL_SUCCESS) {
            fprintf(stderr, "rank %d: create, add or dispatch failed\n", rank);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        /* Every rank has dispatched before any waits (so a killed rank leaves all of them
         * dispatched and none committed). */
        MPI_Barrier(MPI_COMM_WORLD);
        const char* kill_rank = getenv("SCR_POSTSTAGE_KILL_RANK");
        if (kill_rank != NULL && atoi(kill_rank) == rank) {
            raise(SIGKILL);
        }
        rc = AXL_Wait(id) == AXL_SUCCESS ? 0 : 1;
        AXL_Free(id);
    } else if (access(state, F_OK) == 0) { /* a rank whose flush completed freed its state */
        int id = AXL_Create(AXL_XFER_STATE_FILE, "ckpt.1", state);
        rc = id < 0 || AXL_Resume(id) != AXL_SUCCESS || AXL_Wait(id) != AXL_SUCCESS;
        if (id >= 0) {
            AXL_Free(id);
        }
    }
    AXL_Finalize();
    int all = 0;
    MPI_Allreduce(&rc, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (rank == 0) {
        printf("%s: %s\n", argv[1], all == 0 ? "ok" : "failed");
    }
    MPI_Finalize();
    return all;
}
