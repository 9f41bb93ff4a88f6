/*
 * AXL_Config as SCR calls it, with a small stand-in for KVTree's C API in this program (the
 * functions ferry's libaxl looks up in the process; SCR links the real KVTree). Built with
 * -rdynamic so the library can find them.
 *   axl_config     exit 0 when every call returned what axl.h says
 */
#define _DEFAULT_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "axl.h"

/* ---- a minimal KVTree: an element has a key and a subtree; "k = v" is k -> { v -> {} } ---- */
typedef struct kvtree_elem_struct kvtree_elem;
struct kvtree_elem_struct {
    char* key;
    kvtree* hash;
    kvtree_elem* next;
};
struct kvtree_struct {
    kvtree_elem* first;
};

kvtree* kvtree_new(void) { return calloc(1, sizeof(kvtree)); }
kvtree_elem* kvtree_elem_first(const kvtree* h) { return h ? h->first : NULL; }
kvtree_elem* kvtree_elem_next(const kvtree_elem* e) { return e ? e->next : NULL; }
char* kvtree_elem_key(const kvtree_elem* e) { return e ? e->key : NULL; }
kvtree* kvtree_elem_hash(const kvtree_elem* e) { return e ? e->hash : NULL; }

static kvtree* kvtree_set(kvtree* h, const char* key)
{
    for (kvtree_elem* e = h->first; e; e = e->next) {
        if (strcmp(e->key, key) == 0) {
            return e->hash;
        }
    }
    kvtree_elem* e = calloc(1, sizeof *e);
    e->key = strdup(key);
    e->hash = kvtree_new();
    e->next = h->first;
    h->first = e;
    return e->hash;
}

kvtree* kvtree_set_kv(kvtree* h, const char* key, const char* val)
{
    kvtree* k = kvtree_set(h, key);
    k->first = NULL; /* one value (leaks the old one: a test) */
    return kvtree_set(k, val);
}

static const char* value(const kvtree* h, const char* key)
{
    for (kvtree_elem* e = h->first; e; e = e->next) {
        if (strcmp(e->key, key) == 0) {
            return e->hash->first ? e->hash->first->key : NULL;
        }
    }
    return NULL;
}

static int failures = 0;
#define CHECK(cond)                                              \
    do {                                                         \
        if (!(cond)) {                                           \
            fprintf(stderr, "axl_config: failed: %s\n", #cond);  \
            failures++;                                          \
        }                                                        \
    } while (0)

int main(void)
{
    CHECK(AXL_Init() == AXL_SUCCESS);

    /* What SCR sends right after AXL_Init_comm (scr.c): never NULL. */
    kvtree* scr = kvtree_new();
    kvtree_set_kv(scr, AXL_KEY_CONFIG_RANK, "3");
    kvtree_set_kv(scr, AXL_KEY_CONFIG_COPY_METADATA, "1");
    kvtree_set_kv(scr, AXL_KEY_CONFIG_MKDIR, "0");
    kvtree_set_kv(scr, AXL_KEY_CONFIG_DEBUG, "0");
    kvtree_set_kv(scr, AXL_KEY_CONFIG_FILE_BUF_SIZE, "33554432");
    CHECK(AXL_Config(scr) == scr);

    /* Read back: a new tree with the values now in force. */
    kvtree* got = AXL_Config(NULL);
    CHECK(got != NULL);
    if (got != NULL) {
        CHECK(value(got, "RANK") && strcmp(value(got, "RANK"), "3") == 0);
        CHECK(value(got, "COPY_METADATA") && strcmp(value(got, "COPY_METADATA"), "1") == 0);
        CHECK(value(got, "FILE_BUF_SIZE") && strcmp(value(got, "FILE_BUF_SIZE"), "33554432") == 0);
    }

    /* ferry's throttle key is accepted. */
    kvtree* threads = kvtree_new();
    kvtree_set_kv(threads, "FERRY_THREADS", "2");
    CHECK(AXL_Config(threads) == threads);

    /* An unknown key, and options for a transfer that does not exist: NULL (as in AXL). */
    kvtree* bad = kvtree_new();
    kvtree_set_kv(bad, "NO_SUCH_OPTION", "1");
    CHECK(AXL_Config(bad) == NULL);
    kvtree* per_id = kvtree_new();
    kvtree_set_kv(kvtree_set(kvtree_set(per_id, "id"), "7"), AXL_KEY_CONFIG_MKDIR, "1");
    CHECK(AXL_Config(per_id) == NULL);

    /* ... and for one that exists: accepted. */
    int id = AXL_Create(AXL_XFER_SYNC, "cfg", NULL);
    CHECK(id == 0);
    kvtree* per_0 = kvtree_new();
    kvtree_set_kv(kvtree_set(kvtree_set(per_0, "id"), "0"), AXL_KEY_CONFIG_MKDIR, "1");
    CHECK(AXL_Config(per_0) == per_0);
    CHECK(AXL_Free(id) == AXL_SUCCESS);

    CHECK(AXL_Finalize() == AXL_SUCCESS);
    return failures == 0 ? 0 : 1;
}
