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
        uint32_t block_size;  // tokens per memory block
        uint32_t n_init;      // first tokens always attended (attention sinks)
        uint32_t n_local;     // local window, attended at true relative positions
        uint32_t topk;        // memory blocks selected per query chunk and layer
        uint32_t repr_topk;   // representative keys per block (the block mean is used for now)
        bool     absolute;    // false: memory at one fixed distance (n_local); true: true positions
    };

    struct llama_infllm_stats {
        int64_t  n_tokens;      // tokens in the cache
        int64_t  n_blocks;      // complete blocks that left the local window (memory blocks)
        int64_t  n_blocks_max;  // block capacity
        int64_t  selections;    // (ubatch, layer) top-k selections made over at least one block
        uint32_t n_ring;        // local ring cells per layer
        size_t   ring_bytes;    // device bytes of the local rings
        size_t   block_bytes;   // device bytes of the block store
        size_t   repr_bytes;    // device bytes of the representative keys
        size_t   host_bytes;    // bytes of the host tier (none yet)
        int64_t  hits;          // (layer, selected block) pairs already in the working set
        int64_t  misses;        // (layer, selected block) pairs copied into the working set
        size_t   bytes_placed;  // bytes copied into working sets (blocks and sinks)
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

    // 0 on success, -1 when the context does not use the InfLLM cache.
    LLAMA_API int32_t llama_infllm_get_stats(const struct llama_context * ctx, struct llama_infllm_stats * stats);

#ifdef __cplusplus
}
#endif
