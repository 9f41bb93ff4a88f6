/*
 * axl_mpi.h: AXL's collective interface (as in AXL v0.9.0), implemented by ferry.
 *
 * Each call is collective over comm: every rank calls it. It is the serial call followed by a
 * logical-and agreement; it returns 0 when every rank succeeded and 1 otherwise
 * (AXL_Create_comm: the same id on success, -1 on every rank otherwise).
 * AXL_Test_comm is 0 only when every rank's transfer has finished.
 * AXL_Wait_comm commits only after every rank's files are durable: if one rank failed, no
 * rank's destination files appear.
 * MPI is called only inside these calls, in the caller's thread.
 */
#ifndef AXL_MPI_H
#define AXL_MPI_H

#include "axl.h"
#include "mpi.h"

#ifdef __cplusplus
extern "C" {
#endif

int AXL_Init_comm (
  MPI_Comm comm     /**< [IN]  - communicator used for coordination and flow control */
);

int AXL_Finalize_comm (
  MPI_Comm comm     /**< [IN]  - communicator used for coordination and flow control */
);

int AXL_Create_comm (
  axl_xfer_t type,  /**< [IN]  - AXL transfer type (AXL_XFER_SYNC, AXL_XFER_PTHREAD, etc) */
  const char* name, /**< [IN]  - user-defined name for transfer */
  const char* file, /**< [IN]  - optional state file to persist transfer state */
  MPI_Comm comm     /**< [IN]  - communicator used for coordination and flow control */
);

int AXL_Add_comm (
  int id,           /**< [IN]  - transfer hander ID returned from AXL_Create */
  int num,          /**< [IN]  - number of files in src and dst file lists */
  const char** src, /**< [IN]  - list of source paths of length num */
  const char** dst, /**< [IN]  - list of destination paths of length num */
  MPI_Comm comm     /**< [IN]  - communicator used for coordination and flow control */
);

int AXL_Dispatch_comm (
  int id,       /**< [IN]  - transfer hander ID returned from AXL_Create */
  MPI_Comm comm /**< [IN]  - communicator used for coordination and flow control */
);

int AXL_Test_comm (
  int id,       /**< [IN]  - transfer hander ID returned from AXL_Create */
  MPI_Comm comm /**< [IN]  - communicator used for coordination and flow control */
);

int AXL_Wait_comm (
  int id,       /**< [IN]  - transfer hander ID returned from AXL_Create */
  MPI_Comm comm /**< [IN]  - communicator used for coordination and flow control */
);

int AXL_Cancel_comm (
  int id,       /**< [IN]  - transfer hander ID returned from AXL_Create */
  MPI_Comm comm /**< [IN]  - communicator used for coordination and flow control */
);

int AXL_Free_comm (
  int id,       /**< [IN]  - transfer hander ID returned from AXL_Create */
  MPI_Comm comm /**< [IN]  - communicator used for coordination and flow control */
);

int AXL_Stop_comm (
  MPI_Comm comm /**< [IN]  - communicator used for coordination and flow control */
);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* AXL_MPI_H */
