#pragma once

// Models with sliding-window layers (Gemma 3, Cohere 2, ...): the sliding-window layers keep
// llama.cpp's own SWA cache (it holds the window, which is all they attend to), the global
// layers get the InfLLM cache — the way llama_kv_cache_iswa composes two stock caches.
//
// The SWA half is a stock llama_kv_cache_iswa whose layer filter keeps only the sliding-window
// layers: its base cache holds no layer (cell bookkeeping only), its SWA cache the window. The
// memory context derives from llama_kv_cache_iswa_context, so llama.cpp's iSWA graph code runs
// unchanged for the sliding-window layers; the hooks send the global layers to the InfLLM graph.

#include "llama-kv-cache-infllm.h"
#include "llama-kv-cache-iswa.h"

#include <memory>

class llama_kv_cache_infllm_iswa : public llama_memory_i {
public:
    llama_kv_cache_infllm_iswa(const llama_model & model, const llama_infllm_params & params,
                               ggml_type type_k, ggml_type type_v, bool v_trans, bool offload,
                               bool swa_full, uint32_t n_ctx, uint32_t n_ubatch);

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

    llama_kv_cache_infllm * get_infllm() const { return infllm.get(); }
    llama_kv_cache_iswa   * get_swa()    const { return swa.get(); }

private:
    std::unique_ptr<llama_kv_cache_iswa>   swa;      // the sliding-window layers (stock)
    std::unique_ptr<llama_kv_cache_infllm> infllm;   // the global layers
};

class llama_kv_cache_infllm_iswa_context : public llama_kv_cache_iswa_context {
public:
    // status only
    explicit llama_kv_cache_infllm_iswa_context(llama_memory_status status);

    // graph reservation
    explicit llama_kv_cache_infllm_iswa_context(llama_kv_cache_infllm_iswa * mem);

    // a batch: the stock slots of the sliding-window half and the InfLLM context of the same ubatches
    llama_kv_cache_infllm_iswa_context(llama_kv_cache_infllm_iswa * mem, slot_info_vec_t sinfos_base,
                                       slot_info_vec_t sinfos_swa, std::vector<llama_ubatch> ubatches,
                                       llama_memory_context_ptr ctx_infllm);

    bool next() override;
    bool apply() override;

    llama_memory_status get_status() const override { return status; }

    const llama_kv_cache_infllm_context * get_infllm() const {
        return static_cast<const llama_kv_cache_infllm_context *>(ctx_infllm.get());
    }

private:
    llama_memory_context_ptr ctx_infllm;
    llama_memory_status status;
};

// whether the stock (SWA) cache kv still holds every position of sequence 0 that a query at
// position p attends to under the model's sliding window
bool llama_infllm_swa_holds_window(const llama_kv_cache & kv, const llama_hparams & hp, llama_pos p);
