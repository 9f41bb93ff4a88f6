/*
 * A stand-in for the original libaxl_mpi.so that a program was built against: every call
 * fails. ferry's tests link a program with it (RUNPATH), then run that program with ferry's
 * lib directory first on LD_LIBRARY_PATH, as a user swaps libraries under an already-built SCR.
 */
#include <stdio.h>

#include "axl_mpi.h"

static int original(const char* call)
{
    fprintf(stderr, "original AXL stub: %s\n", call);
    return 1;
}

int AXL_Init(void) { return original("AXL_Init"); }
int AXL_Finalize(void) { return original("AXL_Finalize"); }
int AXL_Create(axl_xfer_t t, const char* n, const char* f) { (void)t; (void)n; (void)f; return -original("AXL_Create"); }
kvtree* AXL_Config(const kvtree* c) { (void)c; original("AXL_Config"); return NULL; }
int AXL_Add(int id, const char* s, const char* d) { (void)id; (void)s; (void)d; return original("AXL_Add"); }
int AXL_Dispatch(int id) { (void)id; return original("AXL_Dispatch"); }
int AXL_Resume(int id) { (void)id; return original("AXL_Resume"); }
int AXL_Test(int id) { (void)id; return original("AXL_Test"); }
int AXL_Wait(int id) { (void)id; return original("AXL_Wait"); }
int AXL_Cancel(int id) { (void)id; return original("AXL_Cancel"); }
int AXL_Free(int id) { (void)id; return original("AXL_Free"); }
int AXL_Stop(void) { return original("AXL_Stop"); }
int AXL_Init_comm(MPI_Comm c) { (void)c; return original("AXL_Init_comm"); }
int AXL_Finalize_comm(MPI_Comm c) { (void)c; return original("AXL_Finalize_comm"); }
int AXL_Create_comm(axl_xfer_t t, const char* n, const char* f, MPI_Comm c) { (void)t; (void)n; (void)f; (void)c; return -original("AXL_Create_comm"); }
int AXL_Add_comm(int id, int n, const char** s, const char** d, MPI_Comm c) { (void)id; (void)n; (void)s; (void)d; (void)c; return original("AXL_Add_comm"); }
int AXL_Dispatch_comm(int id, MPI_Comm c) { (void)id; (void)c; return original("AXL_Dispatch_comm"); }
int AXL_Test_comm(int id, MPI_Comm c) { (void)id; (void)c; return original("AXL_Test_comm"); }
int AXL_Wait_comm(int id, MPI_Comm c) { (void)id; (void)c; return original("AXL_Wait_comm"); }
int AXL_Cancel_comm(int id, MPI_Comm c) { (void)id; (void)c; return original("AXL_Cancel_comm"); }
int AXL_Free_comm(int id, MPI_Comm c) { (void)id; (void)c; return original("AXL_Free_comm"); }
int AXL_Stop_comm(MPI_Comm c) { (void)c; return original("AXL_Stop_comm"); }
