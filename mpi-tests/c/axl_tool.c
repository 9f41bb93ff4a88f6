/*
 * A serial AXL client for ferry's tests, built with mpicc against ferry's libaxl:
 *   axl_tool serial TYPE SRC DST     Create, Add, Dispatch, Test until done, Wait, Free
 *   axl_tool flush STATE SRC DST     PTHREAD flush with a state file (a test kills it)
 *   axl_tool resume STATE            SCR's post-stage: Create(STATE_FILE), Resume, Wait, Free
 *   axl_tool cancel SRC DST          Dispatch, Cancel, then Wait fails and Free succeeds
 *   axl_tool stop                    AXL_Stop: this process's and an earlier run's transfers
 *   axl_tool misuse DIR              every misuse returns -1 and says why on stderr
 * Exit status 0 when every call returned what AXL's contract says.
 */
#define _DEFAULT_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "axl.h"

static int failures = 0;

#define EXPECT(call, want)                                                         \
    do {                                                                           \
        int rc_ = (call);                                                          \
        if (rc_ != (want)) {                                                       \
            fprintf(stderr, "axl_tool: %s returned %d, expected %d\n", #call, rc_, \
                    (want));                                                       \
            failures++;                                                            \
        }                                                                          \
    } while (0)

static int type_of(const char* s)
{
    static const char* names[] = {"NULL", "DEFAULT", "SYNC", "ASYNC_DAEMON", "ASYNC_DW",
                                  "ASYNC_BBAPI", "NATIVE", "PTHREAD", "STATE_FILE"};
    for (int i = 0; i < 9; i++) {
        if (strcmp(s, names[i]) == 0) {
            return i;
        }
    }
    return atoi(s);
}

static int serial(axl_xfer_t type, const char* src, const char* dst)
{
    int id = AXL_Create(type, "serial", NULL);
    if (id < 0) {
        return 1;
    }
    EXPECT(AXL_Add(id, src, dst), AXL_SUCCESS);
    EXPECT(AXL_Dispatch(id), AXL_SUCCESS);
    long polls = 0;
    while (AXL_Test(id) != AXL_SUCCESS) {
        polls++;
        usleep(1000); /* the application computes */
    }
    printf("polls %ld\n", polls);
    EXPECT(AXL_Wait(id), AXL_SUCCESS);
    EXPECT(AXL_Free(id), AXL_SUCCESS);
    return 0;
}

static int flush(const char* state, const char* src, const char* dst)
{
    int id = AXL_Create(AXL_XFER_PTHREAD, "ckpt", state);
    if (id < 0) {
        return 1;
    }
    EXPECT(AXL_Add(id, src, dst), AXL_SUCCESS);
    EXPECT(AXL_Dispatch(id), AXL_SUCCESS);
    printf("dispatched\n");
    fflush(stdout);
    EXPECT(AXL_Wait(id), AXL_SUCCESS);
    EXPECT(AXL_Free(id), AXL_SUCCESS);
    return 0;
}

static int resume(const char* state)
{
    int id = AXL_Create(AXL_XFER_STATE_FILE, "scr", state);
    if (id < 0) {
        return 1;
    }
    EXPECT(AXL_Resume(id), AXL_SUCCESS);
    EXPECT(AXL_Wait(id), AXL_SUCCESS);
    EXPECT(AXL_Free(id), AXL_SUCCESS);
    return 0;
}

static int cancel(const char* src, const char* dst)
{
    int id = AXL_Create(AXL_XFER_PTHREAD, "cancelled", NULL);
    if (id < 0) {
        return 1;
    }
    EXPECT(AXL_Add(id, src, dst), AXL_SUCCESS);
    EXPECT(AXL_Dispatch(id), AXL_SUCCESS);
    EXPECT(AXL_Cancel(id), AXL_SUCCESS);
    EXPECT(AXL_Test(id), AXL_SUCCESS); /* finished: cancelled */
    EXPECT(AXL_Wait(id), -1);          /* as AXL's header says */
    EXPECT(AXL_Free(id), AXL_SUCCESS);
    EXPECT(AXL_Free(id), -1); /* gone */
    return 0;
}

static void write_file(const char* path, const char* bytes, size_t n)
{
    FILE* f = fopen(path, "wb");
    if (f == NULL || fwrite(bytes, 1, n, f) != n || fclose(f) != 0) {
        perror(path);
        exit(2);
    }
}

static int misuse(const char* dir)
{
    char src[4096], dst[4096], state[4096], other[4096], corrupt[4096];
    snprintf(src, sizeof src, "%s/src.dat", dir);
    snprintf(dst, sizeof dst, "%s/out/dst.dat", dir);
    snprintf(state, sizeof state, "%s/sync.state", dir);
    snprintf(other, sizeof other, "%s/missing.dat", dir);
    snprintf(corrupt, sizeof corrupt, "%s/corrupt.state", dir);
    write_file(src, "checkpoint bytes\n", 17);

    /* Unknown ids, NULL pointers, unknown types. */
    EXPECT(AXL_Add(12345, src, dst), -1);
    EXPECT(AXL_Dispatch(-1), -1);
    EXPECT(AXL_Test(999), -1);
    EXPECT(AXL_Wait(999), -1);
    EXPECT(AXL_Cancel(999), -1);
    EXPECT(AXL_Free(999), -1);
    EXPECT(AXL_Create(AXL_XFER_NULL, "x", NULL), -1);
    EXPECT(AXL_Create(AXL_XFER_ASYNC_DAEMON, "x", NULL), -1);
    EXPECT(AXL_Create((axl_xfer_t)42, "x", NULL), -1);
    EXPECT(AXL_Create(AXL_XFER_STATE_FILE, "x", NULL), -1);
    EXPECT(AXL_Create(AXL_XFER_STATE_FILE, "x", other), -1);

    int id = AXL_Create(AXL_XFER_SYNC, NULL, state); /* a NULL name is allowed, as in AXL */
    if (id < 0) {
        fprintf(stderr, "axl_tool: create failed\n");
        return 1;
    }
    EXPECT(AXL_Add(id, NULL, dst), -1);
    EXPECT(AXL_Add(id, src, NULL), -1);
    EXPECT(AXL_Add(id, other, dst), -1); /* the source must exist */
    EXPECT(AXL_Wait(id), -1);            /* before Dispatch */
    EXPECT(AXL_Test(id), -1);            /* before Dispatch */
    EXPECT(AXL_Cancel(id), -1);          /* nothing dispatched */
    EXPECT(AXL_Add(id, src, dst), AXL_SUCCESS);
    EXPECT(AXL_Add(id, src, other), -1); /* the same source twice */

    /* The state file of a SYNC transfer, opened as another type: refused, left as it is. */
    EXPECT(AXL_Create(AXL_XFER_PTHREAD, "x", state), -1);

    EXPECT(AXL_Dispatch(id), AXL_SUCCESS);
    EXPECT(AXL_Add(id, src, dst), -1);  /* after Dispatch */
    EXPECT(AXL_Dispatch(id), -1);       /* twice */
    EXPECT(AXL_Test(id), AXL_SUCCESS);
    EXPECT(AXL_Wait(id), AXL_SUCCESS);
    EXPECT(AXL_Cancel(id), -1);         /* completed */
    EXPECT(AXL_Free(id), AXL_SUCCESS);
    if (access(state, F_OK) == 0) {
        fprintf(stderr, "axl_tool: Free left the state file\n");
        failures++;
    }

    /* A corrupt state file and an empty one: refused with a message, nothing crashes. */
    write_file(corrupt, "\x95\x1f\xc3\xf5 this is not a kvtree", 26);
    EXPECT(AXL_Create(AXL_XFER_STATE_FILE, "x", corrupt), -1);
    write_file(corrupt, "", 0);
    EXPECT(AXL_Create(AXL_XFER_STATE_FILE, "x", corrupt), -1);

    /* An empty transfer (a rank without files in a collective flush): as in AXL, it
     * dispatches, is done at once, waits successfully and frees. */
    int empty = AXL_Create(AXL_XFER_PTHREAD, "empty", NULL);
    EXPECT(AXL_Dispatch(empty), AXL_SUCCESS);
    EXPECT(AXL_Test(empty), AXL_SUCCESS);
    EXPECT(AXL_Wait(empty), AXL_SUCCESS);
    EXPECT(AXL_Free(empty), AXL_SUCCESS);

    /* AXL_Config with an unknown key needs a kvtree; with NULL and no KVTree loaded: NULL. */
    EXPECT(AXL_Config(NULL) == NULL, 1);
    return 0;
}

int main(int argc, char** argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: axl_tool serial|flush|resume|cancel|stop|misuse ...\n");
        return 2;
    }
    AXL_Init();
    int rc = 2;
    const char* m = argv[1];
    if (strcmp(m, "serial") == 0 && argc == 5) {
        rc = serial((axl_xfer_t)type_of(argv[2]), argv[3], argv[4]);
    } else if (strcmp(m, "flush") == 0 && argc == 5) {
        rc = flush(argv[2], argv[3], argv[4]);
    } else if (strcmp(m, "resume") == 0 && argc == 3) {
        rc = resume(argv[2]);
    } else if (strcmp(m, "cancel") == 0 && argc == 4) {
        rc = cancel(argv[2], argv[3]);
    } else if (strcmp(m, "stop") == 0 && argc == 2) {
        EXPECT(AXL_Stop(), AXL_SUCCESS);
        rc = 0;
    } else if (strcmp(m, "misuse") == 0 && argc == 3) {
        rc = misuse(argv[2]);
    }
    AXL_Finalize();
    return rc != 0 ? rc : (failures != 0 ? 1 : 0);
}
