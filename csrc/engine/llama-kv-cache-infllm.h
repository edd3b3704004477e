#pragma once

// InfLLM-style KV cache: a local window ring, attention sinks and a block memory from which
// every query chunk selects the top-k blocks by representative keys.
// See docs/infllm-engine.md for the layout and the attention it computes.

#include "llama-infllm.h"
#include "llama-memory.h"
#include "llama-batch.h"

#include "ggml-cpp.h"

#include <cstdint>
#include <map>
#include <vector>

struct llama_model;
struct llama_hparams;

class llama_kv_cache_infllm : public llama_memory_i {
public:
    // per layer tensors
    struct layer {
        uint32_t il;
        ggml_tensor * k_ring;    // [n_embd_k_gqa, n_ring]   keys after RoPE (true positions)
        ggml_tensor * v_ring;    // [n_embd_v_gqa, n_ring]   values (flash attention over the window alone)
        ggml_tensor * v_ring_t;  // [n_ring, n_embd_v_gqa]   values, transposed (window + memory)
        ggml_tensor * k_blk;     // [n_embd_k_gqa, n_cells]  keys by position; un-rotated unless absolute
        ggml_tensor * v_blk;     // [n_embd_v_gqa, n_cells]  values by position
        ggml_tensor * repr;      // [n_embd_k_gqa, n_blocks + 1] f32 sum of un-rotated keys per block (+ scratch)
    };

    llama_kv_cache_infllm(const llama_model & model, const llama_infllm_params & params,
                          ggml_type type_k, ggml_type type_v, bool offload, uint32_t n_ctx, uint32_t n_ubatch);
    ~llama_kv_cache_infllm() = default;

    //
    // llama_memory_i
    //

    llama_memory_context_ptr init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) override;
    llama_memory_context_ptr init_full() override;
    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;

    bool get_can_shift() const override { return false; }

    void clear(bool data) override;

    bool seq_rm  (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id) override;
    void seq_add (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, int d) override;

    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;

    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;

    void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    //
    // InfLLM
    //

    // start of the local window for a ubatch whose first position is p0 (block aligned)
    llama_pos window_start(llama_pos p0) const;

    // complete blocks before the window start ls
    uint32_t n_evicted(llama_pos ls) const;

    // ring cells a ubatch ending before p_end has to look at (all once the ring wrapped)
    uint32_t n_ring_used(llama_pos p_end) const;

    const layer & get_layer(int32_t il) const;

    void get_stats(llama_infllm_stats & stats) const;

    const llama_infllm_params params;
    const llama_hparams & hparams;

    const uint32_t n_ctx;      // positions the cache can hold
    const uint32_t n_ring;     // local ring cells
    const uint32_t n_blocks;   // memory blocks of block_size tokens after the n_init sinks
    const uint32_t n_sel;      // blocks selected per chunk: min(topk, n_blocks)
    const uint32_t n_ubatch;

    uint32_t n_tokens   = 0;   // positions [0, n_tokens) are stored
    int64_t  selections = 0;

private:
    std::vector<layer> layers;
    std::map<int32_t, size_t> map_layer_ids;

    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> ctxs_bufs;
    size_t ring_bytes  = 0;
    size_t block_bytes = 0;
    size_t repr_bytes  = 0;
};

class llama_kv_cache_infllm_context : public llama_memory_context_i {
public:
    // status only (failure or no update)
    explicit llama_kv_cache_infllm_context(llama_memory_status status);

    // graph reservation: shapes of a full ubatch, no state
    explicit llama_kv_cache_infllm_context(llama_kv_cache_infllm * cache);

    // a batch split into ubatches starting at position p0
    llama_kv_cache_infllm_context(llama_kv_cache_infllm * cache, std::vector<llama_ubatch> ubatches);

    bool next() override;
    bool apply() override;

    llama_memory_status  get_status() const override { return status; }
    const llama_ubatch & get_ubatch() const override;

    llama_kv_cache_infllm * get_cache() const { return cache; }

    // graph reservation context: build the largest graph
    bool is_reserve() const { return ubatches.empty(); }

private:
    llama_memory_status status;
    llama_kv_cache_infllm * cache = nullptr;

    std::vector<llama_ubatch> ubatches;
    size_t i_next = 0;
};
