/*
 * axl.h: AXL's serial transfer interface (as in AXL v0.9.0), implemented by ferry.
 *
 * Same functions, types, enum values and return codes as AXL's axl.h, so that a program built
 * against AXL builds (and, with libaxl.so first on LD_LIBRARY_PATH, runs) against ferry.
 * Where ferry's behaviour differs on purpose, see docs/axl-compatibility.md.
 *
 * Return codes: AXL_SUCCESS (0) on success and -1 on failure (AXL_Create: an id >= 0, or -1).
 * Every failure also writes one line to stderr naming the call, the id and the cause.
 */
#ifndef AXL_H
#define AXL_H

#ifdef __cplusplus
extern "C" {
#endif

#define AXL_SUCCESS (0)

#define AXL_VERSION "0.9.0"

/*
 * Options for AXL_Config (string values; SCR sends RANK, COPY_METADATA, MKDIR, DEBUG and
 * FILE_BUF_SIZE, and AXL_Config never returns NULL for them). What each does in ferry:
 *   DEBUG          > 0: progress lines on stderr.                            (effect)
 *   RANK           named in every message.                                   (effect)
 *   COPY_METADATA  1: Wait also gives each file its source's owner/group;
 *                  modes and modification times are always kept.             (effect)
 *   MKDIR          accepted; ferry always creates missing destination
 *                  directories (and makes them durable).                     (no effect)
 *   FILE_BUF_SIZE  accepted; ferry sizes its own I/O.                        (no effect)
 *   USE_EXTENSION  accepted; ferry always copies to a temporary name and
 *                  renames at Wait.                                          (no effect)
 * ferry adds one key, FERRY_THREADS (copy threads per background transfer, default 4; also
 * the environment variable FERRY_AXL_THREADS), to keep a flush from starving the computation.
 * Per-transfer values under "id/<n>/" are checked and accepted. Unknown keys: NULL.
 * The options are read with the KVTree library already in the process (as SCR's); AXL_Config
 * with a NULL tree returns a new tree of the current values, the caller's to delete.
 */
#define AXL_KEY_CONFIG_FILE_BUF_SIZE "FILE_BUF_SIZE"
#define AXL_KEY_CONFIG_DEBUG "DEBUG"
#define AXL_KEY_CONFIG_MKDIR "MKDIR"
#define AXL_KEY_CONFIG_USE_EXTENSION "USE_EXTENSION"
#define AXL_KEY_CONFIG_COPY_METADATA "COPY_METADATA"
#define AXL_KEY_CONFIG_RANK "RANK"

/*
 * Transfer types. The integer values are stored in state files and compiled into callers.
 * SYNC copies inside AXL_Dispatch; DEFAULT, NATIVE, PTHREAD, ASYNC_DW and ASYNC_BBAPI copy on
 * background threads (never calling MPI). ASYNC_DAEMON and NULL are refused. STATE_FILE means
 * "the type recorded in the state file".
 */
typedef enum {
    AXL_XFER_NULL = 0,
    AXL_XFER_DEFAULT,
    AXL_XFER_SYNC,
    AXL_XFER_ASYNC_DAEMON,
    AXL_XFER_ASYNC_DW,
    AXL_XFER_ASYNC_BBAPI,
    AXL_XFER_NATIVE,
    AXL_XFER_PTHREAD,
    AXL_XFER_STATE_FILE,
} axl_xfer_t;

/* Read AXL_DEBUG, AXL_MKDIR, AXL_COPY_METADATA, AXL_USE_EXTENSION (and FERRY_AXL_THREADS). */
int AXL_Init (void);

/* Transfers still open are left as they are. */
int AXL_Finalize (void);

/*
 * A new transfer, or, when state_file names an existing file, the transfer recorded there
 * (xtype must then be the recorded type or AXL_XFER_STATE_FILE). Ids grow from 0 and are never
 * reused. A state file that is corrupt, of another transfer type, or of an unknown state: -1.
 */
int AXL_Create (axl_xfer_t xtype, const char* name, const char* state_file);

typedef struct kvtree_struct kvtree;

kvtree* AXL_Config(
  const kvtree* config        /** [IN] - kvtree of options */
);

/* Add a file (or a directory, copied as a tree) before Dispatch. An existing destination
 * directory receives the source under its own name. The source must exist. */
int AXL_Add (int id, const char* source, const char* destination);

/* Start the transfer (SYNC: copy everything before returning). */
int AXL_Dispatch (int id);

/* Continue a transfer re-created from its state file: what ferry's journal has durable and
 * checked is kept, the rest is copied again (never appended to a file of unknown content). */
int AXL_Resume (int id);

/* Non-blocking: AXL_SUCCESS once the transfer has finished, successfully or not (Wait says
 * which); -1 while it copies, or if it was never dispatched. */
int AXL_Test (int id);

/* Block until the transfer has finished, then commit it: every destination file appears at
 * once, after all are durable. AXL_SUCCESS only if every file is in place and identical. */
int AXL_Wait (int id);

/* Stop a dispatched transfer; its temporary files are removed, no destination file appears.
 * Wait on it then fails. */
int AXL_Cancel (int id);

/* Forget a transfer (its state file is removed). Refused while it copies. */
int AXL_Free (int id);

/* Cancel and free every transfer of this process, and those that an earlier run of the same
 * program (same host, executable and working directory) left behind. */
int AXL_Stop (void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif
