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
#include <functional>
#include <map>
#include <memory>
#include <vector>

struct llama_model;
struct llama_hparams;

class llama_kv_cache_infllm : public llama_memory_i {
public:
    // per layer device tensors. Memory keys are stored position-independent (positions="infllm":
    // rotated back to position 0; "absolute": as the ring held them), so a block on the device
    // stays valid when the window moves; the graph applies the memory position.
    struct layer {
        uint32_t il;
        // attention rows: [0, n_mem_max) memory rows that the graph fills for flash attention
        // (selected blocks, then the sinks, at the memory position), then the n_ring ring cells
        ggml_tensor * k_work;    // [n_embd_k_gqa, n_mem_max + n_ring + ATT_PAD - 1] (padding rows: masked)
        ggml_tensor * v_work;    // [n_embd_v_gqa, n_mem_max + n_ring + ATT_PAD - 1]
        ggml_tensor * k_pool;    // [n_embd_k_gqa, n_pool*block_size] blocks on the device
        ggml_tensor * v_pool;    // [n_embd_v_gqa, n_pool*block_size]
        ggml_tensor * k_sinks;   // [n_embd_k_gqa, n_init] the first n_init tokens (or nullptr)
        ggml_tensor * v_sinks;   // [n_embd_v_gqa, n_init]
        ggml_tensor * repr;      // [n_embd_k_gqa, n_blocks] f32 sum of a block's keys at position 0
        ggml_tensor * sel;       // I32 [n_sel] pool slots of the picked blocks (offload; nullptr when resident)
        ggml_tensor * k_evict;   // [n_embd_k_gqa, n_ev_max*block_size] blocks leaving the window, on
        ggml_tensor * v_evict;   // their way to the host store (offload; nullptr when resident)
    };

    // Hadamard rotations of K (and Q) and of V for quantized cache types, as llama.cpp's own
    // cache applies them (F32 [n, n], n dividing the head), or nullptr
    ggml_tensor * k_rot = nullptr;
    ggml_tensor * v_rot = nullptr;

    // device bytes of everything but the block pool, and of one block in the pool (all layers)
    struct footprint {
        size_t fixed;
        size_t per_block;
    };
    static footprint device_footprint(const llama_model & model, const llama_infllm_params & params,
                                      ggml_type type_k, ggml_type type_v, uint32_t n_ctx, uint32_t n_ubatch,
                                      bool resident, const layer_filter_cb & filter);

    // filter: the layers this cache holds (nullptr: all); the others belong to another cache
    // (the sliding-window layers of llama_kv_cache_infllm_iswa)
    llama_kv_cache_infllm(const llama_model & model, const llama_infllm_params & params,
                          ggml_type type_k, ggml_type type_v, bool offload, uint32_t n_ctx, uint32_t n_ubatch,
                          const layer_filter_cb & filter = nullptr);
    ~llama_kv_cache_infllm() override;

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

    // whether positions [p, n_tokens) can be removed (truncate): the ring still holds what a
    // ubatch at p attends to (the window before p), i.e. at most about n_ubatch + rewind
    // positions are taken back
    bool can_truncate(llama_pos p) const;
    void truncate(llama_pos p);

    // complete blocks before the window start ls
    uint32_t n_evicted(llama_pos ls) const;

    // ring cells a ubatch ending before p_end has to look at (all once the ring wrapped)
    uint32_t n_ring_used(llama_pos p_end) const;

    // the attention reads a multiple of ATT_PAD rows (the rest masked), as stock llama.cpp pads
    // its n_kv: some backend kernels (ggml-vulkan's one-query flash attention) read whole tiles
    static constexpr uint32_t ATT_PAD = 256;
    static uint32_t n_attended(uint32_t n_mem, uint32_t n_ring_used) { return GGML_PAD(n_mem + n_ring_used, ATT_PAD); }

    // blocks selected for a ubatch whose window starts at ls: min(n_sel, n_evicted(ls))
    uint32_t n_selected(llama_pos ls) const;

    // position the memory keys take for a ubatch whose window starts at ls (positions="infllm"):
    // just before the window, so a query at p sees them at distance p - ls + 1
    static llama_pos memory_position(llama_pos ls) { return ls - 1; }

    // name prefixes of the per-layer graph nodes at which the scheduler hands over to the
    // cache (eval callback; offload mode only). EVICT_NODE comes after the blocks that left
    // the window were copied to the eviction buffer; SYNC_NODE is the selection, after which
    // the cache makes the picked blocks resident and writes their slots. The graph orders
    // every reader of what the cache writes after these nodes by explicit edges.
    static constexpr const char * EVICT_NODE = "infllm_evict-";
    static constexpr const char * SYNC_NODE  = "infllm_sel-";

    // what the ubatch being computed does (set by the memory context's apply())
    struct ubatch_plan {
        llama_pos ls      = 0;      // window start
        uint32_t  ev_b0   = 0;      // blocks [ev_b0, ev_b1) leave the window in this ubatch
        uint32_t  ev_b1   = 0;
        bool      ev_sinks = false; // the sinks leave the window in this ubatch
    };

    // at the evict node of layer il: queue the copy of the evicted blocks to the host store
    void on_evict(int32_t il);

    // at the sync node of layer il: make the blocks of `sel` (I32 ids) resident in the pool
    // (fetching the missing ones from the host store) and write their slots to the layer's sel
    void on_sync(int32_t il, const ggml_tensor * sel);

    // the eval-callback state that routes the cache's nodes here; owned by the cache
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
    const uint32_t n_ev_max;   // blocks that can leave the window in one ubatch

    // every block has a pool slot (slot = block id): no host store, no hand-over to the cache
    // during the compute; otherwise the pool caches blocks of the host store (offload)
    bool resident = true;
    uint32_t n_pool = 0;       // device block slots per layer

    // decode steps attend with llama-infllm-attn-cpu instead of ggml_flash_attn_ext (the cache
    // lives in CPU memory with f16 K/V; PYLLAMA_INF_ATTN=ggml turns it off, for comparisons)
    bool one_query_kernel = false;

    uint32_t n_tokens   = 0;   // positions [0, n_tokens) are stored
    int64_t  selections = 0;
    int64_t  n_ubatches = 0;   // ubatches computed

    ubatch_plan cur;           // the ubatch being computed

    // plan the ubatch that starts at p0 and advance the eviction state (memory context's apply())
    void begin_ubatch(llama_pos p0, uint32_t n_q);

    // host-side tables of the ubatch (each may be nullptr): ring cells (working-set rows) and
    // -positions of the rows that leave the window, their rows in the pool or the eviction
    // buffer, and the ids of their blocks
    void eviction_rows(int32_t * cells, int32_t * neg_pos, int32_t * dst, int32_t * blk) const;

private:
    // per layer host-side state of the pool (offload)
    struct layer_state {
        std::vector<int32_t> slot_blk;    // block held by each pool slot (-1: empty)
        std::vector<int64_t> slot_used;   // last selection that wanted it (LRU)
        std::vector<int32_t> blk_slot;    // slot of each block (-1: host store only)
        std::vector<int32_t> sel_slots;   // the slots last written to the layer's sel tensor
    };

    std::unique_ptr<void, void (*)(void *)> router{nullptr, [](void *) {}};

    // what a saved state must match (state_write / state_read)
    std::vector<uint32_t> state_header() const;
    // the regions of a state of nt tokens, ns stored blocks (and the sinks if stored), in the
    // order they are written and read: device tensor ranges go to `dev`, host store rows to `host`
    void state_regions(uint32_t nt, uint32_t ns, bool sinks,
                       const std::function<void(ggml_tensor *, size_t, size_t)> & dev,
                       const std::function<void(uint8_t *, size_t)> & host) const;

    size_t   k_row_bytes = 0;  // bytes of one K / V row (one layer)
    size_t   v_row_bytes = 0;
    uint32_t n_stored    = 0;  // blocks moved out of the ring (all layers move together)
    bool     sinks_stored = false;

    std::vector<layer_state> states;
    std::unique_ptr<llama_infllm_host_store> store;   // offload only
    std::unique_ptr<llama_infllm_transfer>   xfer;    // offload only
    // host memory of the store's type (pinned where the device has it) for the selection's
    // block ids and the slots written back: [0, n_sel) ids, [n_sel, 2 n_sel) slots. Copies
    // from pageable memory are synchronous on CUDA and go through a staging buffer and a
    // nested submit on Vulkan
    ggml_backend_buffer_ptr sel_host;
    bool d2h_pending = false;  // evicted blocks on their way to the host store

    int64_t n_callbacks = 0;   // hand-overs to the cache during the compute (each stops the device queue)
    int64_t n_sync     = 0;    // selections handled by on_sync (LRU clock)
    int64_t blk_hits   = 0;    // picked blocks found on the device
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

    // the ubatches of a batch context (empty for a reservation)
    const std::vector<llama_ubatch> & get_ubatches() const { return ubatches; }

    // graph reservation context: build the largest graph
    bool is_reserve() const { return ubatches.empty(); }

private:
    llama_memory_status status;
    llama_kv_cache_infllm * cache = nullptr;

    std::vector<llama_ubatch> ubatches;
    size_t i_next = 0;
};

// the InfLLM part of a memory context: the context itself, or the InfLLM half of the
// sliding-window composition (llama-kv-cache-infllm-iswa.h); nullptr for any other context
const llama_kv_cache_infllm_context * llama_infllm_context_of(const llama_memory_context_i * mctx);

// the InfLLM cache of a memory (plain or the composition), or nullptr
llama_kv_cache_infllm * llama_infllm_cache_of(llama_memory_i * mem);
const llama_kv_cache_infllm * llama_infllm_cache_of(const llama_memory_i * mem);

// while llama_init_from_model_infllm creates a context on this thread: keep the first reason a
// part of the engine refused the model (llama.cpp logs exceptions from graph building and
// returns null, so the caller would not see it); no-op otherwise
void llama_infllm_note_error(const std::string & msg);
