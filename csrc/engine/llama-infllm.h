#pragma once

// Public C API of the InfLLM KV cache (pyllama-inf). It sits beside llama.h and does not
// change llama_context_params: the cache is chosen by creating the context with
// llama_init_from_model_infllm().

#include "llama.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

    struct llama_infllm_params {
        uint32_t block_size;   // tokens per memory block
        uint32_t n_init;       // first tokens always attended (attention sinks)
        uint32_t n_local;      // local window, attended at true relative positions
        uint32_t topk;         // memory blocks selected per query chunk and layer
        uint32_t rewind;       // ring cells kept beyond the window: how far the context's tail can be taken back
        uint32_t repr_keys;    // representative key of a block: 0 the sum of its keys, r the sum of the r keys
                               // the evicting chunk's query attends to most (r <= block_size)
        bool     absolute;     // false: memory at one position just before the window; true: true positions
        uint32_t true_below;   // with absolute false: a ubatch whose positions are all below this sees memory
                               // at true positions too (the model's trained context; 0: never)
        bool     packed;       // with absolute false, where memory is not at true positions: the sinks and the
                               // picked blocks laid out in their order just before the window, each row at its
                               // own position (false: every memory row at the one position before the window)
        size_t   budget_bytes; // device bytes the cache may use (0: no bound; cache_blocks sizes the pool)
        int32_t  cache_blocks; // device block slots per layer without a budget (-1: every block); -1 with a budget
        size_t   host_budget;  // host bytes the block store may reach (0: unbounded)
    };

    struct llama_infllm_stats {
        int64_t  n_tokens;        // tokens in the cache
        int64_t  n_blocks;        // complete blocks that left the local window
        int64_t  n_blocks_max;    // block capacity
        int64_t  selections;      // (ubatch, layer) top-k selections made over at least one block
        uint32_t n_ring;          // local ring cells per layer
        uint32_t n_pool;          // device block slots per layer
        bool     resident;        // every block has a device slot (no host store, no transfers)
        size_t   work_bytes;      // device bytes of the working sets (attention rows, sinks, eviction buffers)
        size_t   pool_bytes;      // device bytes of the block pool
        size_t   repr_bytes;      // device bytes of the representative keys
        size_t   device_bytes;    // work + pool + repr
        size_t   budget_bytes;    // the budget (0: none)
        size_t   host_bytes;      // bytes of the host block store (grows in chunks, kept across sequences)
        int64_t  blocks_resident; // (layer, block) pairs in the device pool
        int64_t  hits;            // (layer, picked block) pairs found in the pool (offload)
        int64_t  misses;          // (layer, picked block) pairs fetched from the host store (offload)
        int64_t  ubatches;        // ubatches computed
        int64_t  callbacks;       // hand-overs to the cache during a compute (each synchronises the device)
        int64_t  bytes_h2d;       // host -> device bytes (blocks, their slots)
        int64_t  bytes_d2h;       // device -> host bytes (evicted blocks)
        double   transfer_wait_s; // time spent waiting for transfers
        double   host_work_s;     // time in the cache's callbacks during graph compute (includes the waits)
    };

    LLAMA_API struct llama_infllm_params llama_infllm_default_params(void);

    // Like llama_init_from_model, with the InfLLM cache as the context's memory. Returns
    // nullptr on failure; when err is given, the reason is written there.
    LLAMA_API struct llama_context * llama_init_from_model_infllm(
            struct llama_model * model,
            struct llama_context_params cparams,
            const struct llama_infllm_params * iparams,
            char * err,
            size_t err_size);

    // Make the context's memory hold positions [0, n_keep) of sequence 0 and nothing after
    // them: 1 done, 0 not possible without losing what the next ubatch at n_keep attends to
    // (the InfLLM ring or a sliding-window cache already overwrote it; the memory is then
    // unchanged). n_keep = 0 always succeeds (the memory is cleared).
    LLAMA_API int32_t llama_infllm_keep_prefix(struct llama_context * ctx, llama_pos n_keep);

    // Save the context's memory (any cache) to path with the caller's head bytes (read back by
    // the caller; see llama-infllm-state.cpp for the format). 0 on success, -1 on failure (err).
    LLAMA_API int32_t llama_infllm_state_save(struct llama_context * ctx, const char * path,
                                              const void * head, size_t head_len, char * err, size_t err_size);

    // Load a state saved by llama_infllm_state_save. 0 on success; -1: refused before the memory
    // was touched (unreadable, truncated, corrupted); -2: the memory could not take it and was
    // cleared. The reason goes to err.
    LLAMA_API int32_t llama_infllm_state_load(struct llama_context * ctx, const char * path, char * err, size_t err_size);

    // 0 on success, -1 when the context does not use the InfLLM cache.
    LLAMA_API int32_t llama_infllm_get_stats(const struct llama_context * ctx, struct llama_infllm_stats * stats);

#ifdef __cplusplus
}
#endif
