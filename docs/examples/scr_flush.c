/*
 * An SCR-style asynchronous checkpoint flush through AXL's interface, on ferry's libaxl_mpi.
 *
 * Every rank writes its checkpoint files to fast storage (the "cache"), dispatches their flush
 * to the parallel file system, and computes while the flush runs in the background, testing
 * it now and then. When every rank's flush has finished, the collective wait commits the
 * checkpoint on every rank at once; only after that collective success does rank 0 mark the
 * checkpoint complete. If any rank failed, no rank's files appear and nothing is marked.
 *
 *   mpicc -o scr_flush scr_flush.c -I$PREFIX/include -L$PREFIX/lib -laxl_mpi
 *   mpirun -n 4 ./scr_flush CACHE_DIR PFS_DIR [FILES_PER_RANK] [MIB_PER_FILE]
 *
 * (ferry's test suite builds and runs this file.)
 */
#define _DEFAULT_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mpi.h>

#include "axl_mpi.h"

/* Write `mib` MiB of rank-specific bytes to `path`: the application's checkpoint. */
static int write_checkpoint(const char* path, int rank, int i, int mib)
{
    FILE* f = fopen(path, "wb");
    if (f == NULL) {
        return -1;
    }
    static char buf[1 << 20];
    for (int m = 0; m < mib; m++) {
        for (size_t b = 0; b < sizeof buf; b++) {
            buf[b] = (char)(rank * 131 + i * 17 + m * 7 + (int)(b % 251));
        }
        if (fwrite(buf, 1, sizeof buf, f) != sizeof buf) {
            fclose(f);
            return -1;
        }
    }
    return fclose(f);
}

static void mkdir_p(const char* dir)
{
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", dir);
    for (char* p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            mkdir(tmp, 0755);
            *p = '/';
        }
    }
    mkdir(tmp, 0755);
}

int main(int argc, char** argv)
{
    MPI_Init(&argc, &argv);
    int rank, ranks;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    if (argc < 3) {
        if (rank == 0) {
            fprintf(stderr, "usage: scr_flush CACHE_DIR PFS_DIR [FILES_PER_RANK] [MIB_PER_FILE]\n");
        }
        MPI_Finalize();
        return 2;
    }
    const char* cache = argv[1];
    const char* pfs = argv[2];
    int files = argc > 3 ? atoi(argv[3]) : 4;
    int mib = argc > 4 ? atoi(argv[4]) : 8;

    if (AXL_Init_comm(MPI_COMM_WORLD) != AXL_SUCCESS) {
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    /* The checkpoint, on fast storage. */
    char dir[2048], src[3072], dst[4096];
    snprintf(dir, sizeof dir, "%s/rank%d", cache, rank);
    mkdir_p(dir);
    for (int i = 0; i < files; i++) {
        snprintf(src, sizeof src, "%s/ckpt.%d", dir, i);
        if (write_checkpoint(src, rank, i, mib) != 0) {
            perror(src);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
    }

    /* Flush it: every rank adds its own files. (A test may point one rank's destination at
     * a place it cannot write, to see that no rank's checkpoint then appears.) */
    int id = AXL_Create_comm(AXL_XFER_PTHREAD, "ckpt.1", NULL, MPI_COMM_WORLD);
    if (id < 0) {
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    const char* broken = getenv("SCR_FLUSH_BREAK_RANK");
    int added = 1;
    for (int i = 0; i < files; i++) {
        snprintf(src, sizeof src, "%s/ckpt.%d", dir, i);
        if (broken != NULL && atoi(broken) == rank) {
            /* A directory that cannot be made. */
            snprintf(dst, sizeof dst, "/proc/ferry-example/ckpt.1/rank%d/ckpt.%d", rank, i);
        } else {
            snprintf(dst, sizeof dst, "%s/ckpt.1/rank%d/ckpt.%d", pfs, rank, i);
        }
        added &= AXL_Add(id, src, dst) == AXL_SUCCESS;
    }
    int all_added = 0;
    MPI_Allreduce(&added, &all_added, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    if (!all_added || AXL_Dispatch_comm(id, MPI_COMM_WORLD) != AXL_SUCCESS) {
        AXL_Free_comm(id, MPI_COMM_WORLD);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    /* Compute while the flush runs; test it between steps (never blocks). */
    long steps = 0;
    while (AXL_Test_comm(id, MPI_COMM_WORLD) != AXL_SUCCESS) {
        usleep(1000); /* one step of the computation */
        steps++;
    }

    /* Every rank's flush has ended: commit, collectively. */
    int rc = AXL_Wait_comm(id, MPI_COMM_WORLD);
    if (rank == 0) {
        if (rc == AXL_SUCCESS) {
            /* Only now is the checkpoint complete, on every rank. */
            snprintf(dst, sizeof dst, "%s/ckpt.1/COMPLETE", pfs);
            FILE* f = fopen(dst, "w");
            if (f == NULL || fprintf(f, "%d ranks\n", ranks) < 0 || fclose(f) != 0) {
                perror(dst);
                rc = 1;
            }
        }
        printf("flush of %d ranks x %d files: %s after %ld compute steps\n", ranks, files,
               rc == AXL_SUCCESS ? "committed" : "failed, checkpoint not marked", steps);
    }
    AXL_Free_comm(id, MPI_COMM_WORLD);
    AXL_Finalize_comm(MPI_COMM_WORLD);
    MPI_Finalize();
    return rc == AXL_SUCCESS ? 0 : 1;
}
