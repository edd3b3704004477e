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
#include <memory>
#include <vector>

struct llama_model;
struct llama_hparams;

class llama_kv_cache_infllm : public llama_memory_i {
public:
    // per layer tensors
    struct layer {
        uint32_t il;
        // attention working set, rows: [0, n_sel*block_size) slots holding the selected
        // blocks, then n_init rows for the sinks, then the n_ring cells of the local ring
        ggml_tensor * k_work;    // [n_embd_k_gqa, n_mem_max + n_ring]
        ggml_tensor * v_work;    // [n_embd_v_gqa, n_mem_max + n_ring]
        ggml_tensor * k_blk;     // [n_embd_k_gqa, n_cells]  keys by position; un-rotated unless absolute
        ggml_tensor * v_blk;     // [n_embd_v_gqa, n_cells]  values by position
        ggml_tensor * repr;      // [n_embd_k_gqa, n_blocks + 1] f32 sum of un-rotated keys per block (+ scratch)
    };

    // RoPE of the model as the graph applies it (host-side rotation of memory keys)
    struct rope_params {
        int   n_rot;
        bool  neox;
        float freq_base;
        float freq_scale;
        float attn_factor;
    };

    llama_kv_cache_infllm(const llama_model & model, const llama_infllm_params & params, const rope_params & rope,
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

    // blocks selected for a ubatch whose window starts at ls: min(n_sel, n_evicted(ls))
    uint32_t n_selected(llama_pos ls) const;

    // position the memory keys take for a ubatch whose window starts at ls (positions="infllm"):
    // just before the window, so a query at p sees them at distance p - ls + 1
    static llama_pos memory_position(llama_pos ls) { return ls - 1; }

    // name prefix of the per-layer graph node after which the memory of that layer is placed
    static constexpr const char * SYNC_NODE = "infllm_sel-";

    // place the memory of layer il for the current ubatch into its working set: the sinks and
    // the blocks of `sel` (I32 ids, or nullptr when no block is selected). Slots that already
    // hold a selected block at the current memory position are kept (hits).
    void place_memory(int32_t il, const ggml_tensor * sel);

    // the eval-callback state that routes sync nodes here; owned by the cache
    void set_router(std::unique_ptr<void, void (*)(void *)> r) { router = std::move(r); }

    const layer & get_layer(int32_t il) const;

    void get_stats(llama_infllm_stats & stats) const;

    const llama_infllm_params params;
    const llama_hparams & hparams;

    const uint32_t n_ctx;      // positions the cache can hold
    const uint32_t n_ring;     // local ring cells
    const uint32_t n_blocks;   // memory blocks of block_size tokens after the n_init sinks
    const uint32_t n_sel;      // blocks selected per chunk: min(topk, n_blocks)
    const uint32_t n_mem_max;  // memory rows of the working set: n_init + n_sel*block_size
    const uint32_t n_ubatch;

    uint32_t n_tokens   = 0;   // positions [0, n_tokens) are stored
    int64_t  selections = 0;

    // the ubatch being computed (set by the memory context's apply())
    llama_pos cur_ls = 0;

private:
    // per layer: which block each slot holds and at which memory position its keys are
    struct slot_state {
        std::vector<int32_t>   blk;   // -1: empty
        std::vector<llama_pos> ref;
        llama_pos sinks_ref = -1;     // memory position of the placed sinks
        bool      sinks_ok  = false;
    };

    // copy `n` rows starting at position `pos` of the block store into working-set row `row`,
    // keys rotated from position 0 to `ref` (positions="infllm") or copied as stored
    void copy_rows(const layer & l, llama_pos pos, uint32_t n, uint32_t row, llama_pos ref);

    const rope_params rope;
    std::unique_ptr<void, void (*)(void *)> router{nullptr, [](void *) {}};

    std::vector<slot_state> slots;
    std::vector<uint8_t>    staging;
    std::vector<float>      rope_cache;

    int64_t blk_hits   = 0;
    int64_t blk_misses = 0;
    size_t  bytes_placed = 0;

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
