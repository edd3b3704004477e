#pragma once

// Single-query attention over the InfLLM working set for the CPU backend, as two ggml custom
// ops: partial softmax sums per (KV head, cell chunk) in parallel, then their merge. It does
// what ggml_flash_attn_ext does for one query token (same mask convention, f16 K/V) with f32
// accumulation, reading each K/V row once for all query heads that share it (GQA).

#include "ggml.h"

// q: F32 [d_k, n_head, 1] (contiguous); k, v: F16 views [d, n_kv_head, n_kv] with contiguous rows
// per head; mask: F16 [n_kv, >= 1] (row 0 is used; -inf = not attended). Returns F32
// [d_v*n_head, 1]. n_chunks: cell chunks per KV head (work units for the threads).
ggml_tensor * llama_infllm_attn_one_query_cpu(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                              ggml_tensor * mask, float kq_scale, int n_chunks);

// whether this build and CPU can run the kernel's vector path (otherwise a scalar one runs)
bool llama_infllm_attn_cpu_vectorized();
