#pragma once

// InfLLM-style KV cache: a local window ring, attention sinks and a block memory from which
// every query chunk selects the top-k blocks by representative keys.
// See docs/infllm-engine.md for the layout and the attention it computes.

#include "llama-infllm.h"
#include "llama-infllm-store.h"
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
    // per layer device tensors
    struct layer {
        uint32_t il;
        // attention working set, rows: [0, n_sel*block_size) slots holding the selected
        // blocks, then n_init rows for the sinks, then the n_ring cells of the local ring
        ggml_tensor * k_work;    // [n_embd_k_gqa, n_mem_max + n_ring]
        ggml_tensor * v_work;    // [n_embd_v_gqa, n_mem_max + n_ring]
        ggml_tensor * repr;      // [n_embd_k_gqa, n_blocks] f32 sum of un-rotated keys per block
        ggml_tensor * k_pool;    // [n_embd_k_gqa, n_pool*block_size] device block cache (victims of
        ggml_tensor * v_pool;    // [n_embd_v_gqa, n_pool*block_size]  the working set), or nullptr
    };

    // RoPE of the model as the graph applies it (host-side rotation of memory keys)
    struct rope_params {
        int   n_rot;
        bool  neox;
        float freq_base;
        float freq_scale;
        float attn_factor;
    };

    // device bytes of everything but the block cache, and of one block in the cache (all layers)
    struct footprint {
        size_t fixed;
        size_t per_block;
    };
    static footprint device_footprint(const llama_model & model, const llama_infllm_params & params,
                                      ggml_type type_k, ggml_type type_v, uint32_t n_ctx, uint32_t n_ubatch);

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

    // name prefixes of the per-layer graph nodes at which the scheduler hands over to the
    // cache (eval callback): EVICT_NODE before the selection, in ubatches whose window start
    // passed blocks not yet stored; SYNC_NODE after the selection. Both come before the
    // ubatch's ring writes.
    static constexpr const char * EVICT_NODE = "infllm_evict-";
    static constexpr const char * SYNC_NODE  = "infllm_sel-";

    // whether a ubatch whose window starts at ls has blocks (or the sinks) to evict
    bool needs_eviction(llama_pos ls) const;

    // at the evict node of layer il: move the blocks that left the window (and, once, the
    // sinks) from the ring to the host store and write their representative keys
    void on_evict(int32_t il);

    // at the sync node of layer il: place the sinks and the blocks of `sel` (I32 ids, or
    // nullptr when no block is selected) into the working set. A slot that already holds a
    // picked block at the current memory position is kept; a missing block comes from the
    // device block cache when it is there, else from the host store.
    void on_sync(int32_t il, const ggml_tensor * sel);

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
    const uint32_t n_mem_max;  // memory rows of the working set: n_sel*block_size + n_init
    const uint32_t n_ubatch;

    // decode steps attend with llama-infllm-attn-cpu instead of ggml_flash_attn_ext (the cache
    // lives in CPU memory with f16 K/V; PYLLAMA_INF_ATTN=ggml turns it off, for comparisons)
    bool one_query_kernel = false;

    uint32_t n_tokens   = 0;   // positions [0, n_tokens) are stored
    int64_t  selections = 0;

    // the ubatch being computed (set by the memory context's apply())
    llama_pos cur_ls = 0;

private:
    // which block a slot holds and at which memory position its keys are rotated
    struct slot {
        int32_t   blk  = -1;   // -1: empty
        llama_pos ref  = 0;
        int64_t   used = 0;    // last selection that wanted it (LRU)
    };

    // per layer host-side state
    struct layer_state {
        std::vector<slot> work;           // n_sel working-set slots
        std::vector<slot> pool;           // n_pool device block-cache slots
        uint32_t  n_stored  = 0;          // blocks moved to the host store
        bool      sinks_stored = false;
        bool      sinks_placed = false;
        llama_pos sinks_ref = 0;
    };

    // ring -> host store: the sinks and blocks [st.n_stored, n_ev); representative keys
    void evict(const layer & l, layer_state & st, uint32_t n_ev);

    // host store rows of block blk (-1: sinks) -> working-set rows from `row`, keys rotated
    // from position 0 to `ref` (positions="infllm") or copied as stored
    void fetch(const layer & l, int32_t blk, uint32_t row, llama_pos ref);

    // device copy of one block between a working-set slot and a block-cache slot
    void copy_block(const layer & l, uint32_t work_slot, uint32_t pool_slot, bool to_pool);

    const rope_params rope;
    std::unique_ptr<void, void (*)(void *)> router{nullptr, [](void *) {}};

    uint32_t n_pool = 0;       // device block-cache slots (from the byte budget)
    size_t   k_row_bytes = 0;  // bytes of one K / V row (one layer)
    size_t   v_row_bytes = 0;

    std::vector<layer_state> states;
    std::unique_ptr<llama_infllm_host_store> store;
    std::unique_ptr<llama_infllm_transfer>   xfer;
    std::vector<uint8_t> staging;
    std::vector<float>   rope_cache;
    std::vector<float>   rot_scratch;
    std::vector<float>   repr_row;

    int64_t n_sync     = 0;    // sync callbacks (layer, ubatch) with memory
    int64_t blk_hits   = 0;    // picked blocks already in the working set
    int64_t pool_hits  = 0;    // picked blocks copied from the device block cache
    double  host_work_s = 0.0; // time in on_evict / on_sync
    int64_t blk_misses = 0;    // picked blocks fetched from the host store

    std::vector<layer> layers;
    std::map<int32_t, size_t> map_layer_ids;

    ggml_context_ptr        ctx_tensors;   // the per-layer device tensors
    ggml_backend_buffer_ptr buf_device;    // their one buffer
    size_t work_bytes = 0;
    size_t pool_bytes = 0;
    size_t repr_bytes = 0;
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
