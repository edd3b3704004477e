#pragma once

// Single-query attention over the InfLLM working set for the CPU backend, as two ggml custom
// ops: partial softmax sums per (KV head, cell chunk) in parallel, then their merge. It does
// what ggml_flash_attn_ext does for one query token (same mask convention, f16 or q8_0 K/V) with f32
// accumulation, reading each K/V row once for all query heads that share it (GQA).

#include "ggml.h"

// The memory the query attends besides the ring, read where the cache stores it: blocks in the
// pool (rows slot*block_size ..) and the sinks (keys at position 0), with a query rotated to see
// them. Either every memory key sits at one position (q: the query rotated once), or each at its
// own (true positions: q_blocks and rot): row i of a block that starts at position s has the score
// (R(-s) q) . (R(i) k), a query rotated per block and keys turned by their offset in the block.
struct llama_infllm_attn_memory {
    ggml_tensor * q;         // F32 [d_k, n_head, 1] contiguous: the query as it sees memory keys;
                             // with rot: the query as it sees the sinks (they start at position 0)
    ggml_tensor * q_blocks;  // F32 [d_k, n_head, n_blk] contiguous, with rot: the query as it sees each block
    ggml_tensor * rot;       // F32 [d_k, >= max(block_size, n_init)] contiguous, or nullptr: row i is
                             // RoPE of the unit pattern (llama_infllm_attn_rot_unit) at position i
    int           rope_dims; // with rot: the RoPE's rotated dimensions
    bool          rope_neox; // with rot: NEOX pairs (i, i + rope_dims/2), else (2i, 2i + 1)
    ggml_tensor * k_pool;    // F16 or Q8_0 [n_embd_k_gqa, n_slots*block_size] contiguous rows
    ggml_tensor * v_pool;    // F16 or Q8_0 [n_embd_v_gqa, n_slots*block_size]
    ggml_tensor * slots;     // I32 [n_blk]: the pool slots of the attended blocks, in mask order; or nullptr
    ggml_tensor * k_sinks;   // F16 [n_embd_k_gqa, n_init], or nullptr
    ggml_tensor * v_sinks;   // F16 [n_embd_v_gqa, n_init]
    int           block_size;
};

// q: F32 [d_k, n_head, 1] (contiguous); k, v: F16 or Q8_0 views [d, n_kv_head, n_ring] of the ring with
// contiguous rows per head; mem: the memory (or nullptr); mask: F16 [n_mem + n_ring, >= 1]
// (row 0 is used; -inf = not attended) whose columns are the attended blocks (block_size each),
// the sinks, then the ring cells. Returns F32 [d_v*n_head, 1]. n_chunks: cell chunks (work
// units for the threads).
ggml_tensor * llama_infllm_attn_one_query_cpu(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                              const llama_infllm_attn_memory * mem, ggml_tensor * mask,
                                              float kq_scale, int n_chunks);

// F32 [d, 1, n]: in every row a 1 at the first element of each rotated pair and 0 elsewhere, so
// that RoPE of it at position i holds the cosines and sines of position i where the kernel looks
// for them (llama_infllm_attn_memory::rot). src: any tensor of the graph, computed before it (the
// op reads nothing; it places the node on the CPU backend).
ggml_tensor * llama_infllm_attn_rot_unit(ggml_context * ctx, ggml_tensor * src, int64_t d, int64_t n,
                                         int rope_dims, bool rope_neox);

// the K/V row types the kernel reads (ring, pool and sinks): F16 and Q8_0
bool llama_infllm_attn_cpu_type_ok(ggml_type type);

// whether this build and CPU can run the kernel's vector path (otherwise a scalar one runs)
bool llama_infllm_attn_cpu_vectorized();
