// The sliding-window composition: a stock SWA cache for the sliding-window layers, the InfLLM
// cache for the global ones (see the header).

#include "llama-kv-cache-infllm-iswa.h"

#include "llama-impl.h"
#include "llama-model.h"

#include <stdexcept>

llama_kv_cache_infllm_iswa::llama_kv_cache_infllm_iswa(
        const llama_model & model, const llama_infllm_params & params, ggml_type type_k, ggml_type type_v,
        bool v_trans, bool offload, bool swa_full, uint32_t n_ctx, uint32_t n_ubatch) {
    const llama_hparams & hp = model.hparams;
    // swa_full = false: the stock half keeps the window only, all that a sliding-window layer
    // looks at (llama.cpp's own window-size SWA cache, exactly)
    swa = std::make_unique<llama_kv_cache_iswa>(
            model, type_k, type_v, v_trans, offload, swa_full, /*unified =*/ true,
            n_ctx, /*n_seq_max =*/ 1, n_ubatch, /*n_pad =*/ 1, /*mem_other =*/ nullptr,
            [&hp](int32_t il) { return hp.is_swa((uint32_t) il); }, nullptr, nullptr);
    infllm = std::make_unique<llama_kv_cache_infllm>(
            model, params, type_k, type_v, offload, n_ctx, n_ubatch,
            [&hp](int32_t il) { return !hp.is_swa((uint32_t) il); });
}

llama_memory_context_ptr llama_kv_cache_infllm_iswa::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    // the InfLLM half splits the batch and checks it (one sequence, appended positions)
    llama_memory_context_ptr ctx_infllm = infllm->init_batch(balloc, n_ubatch, embd_all);
    if (ctx_infllm->get_status() != LLAMA_MEMORY_STATUS_SUCCESS) {
        return std::make_unique<llama_kv_cache_infllm_iswa_context>(ctx_infllm->get_status());
    }
    std::vector<llama_ubatch> ubatches = static_cast<const llama_kv_cache_infllm_context *>(ctx_infllm.get())->get_ubatches();
    auto sinfos_base = swa->get_base()->prepare(ubatches);
    auto sinfos_swa  = swa->get_swa()->prepare(ubatches);
    if (sinfos_base.empty() || sinfos_swa.empty()) {
        return std::make_unique<llama_kv_cache_infllm_iswa_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }
    return std::make_unique<llama_kv_cache_infllm_iswa_context>(this, std::move(sinfos_base), std::move(sinfos_swa),
                                                                std::move(ubatches), std::move(ctx_infllm));
}

llama_memory_context_ptr llama_kv_cache_infllm_iswa::init_full() {
    return std::make_unique<llama_kv_cache_infllm_iswa_context>(this);
}

llama_memory_context_ptr llama_kv_cache_infllm_iswa::init_update(llama_context * lctx, bool optimize) {
    // positions are never shifted (get_can_shift) and neither half is defragmented
    GGML_UNUSED(lctx);
    GGML_UNUSED(optimize);
    return std::make_unique<llama_kv_cache_infllm_iswa_context>(LLAMA_MEMORY_STATUS_NO_UPDATE);
}

void llama_kv_cache_infllm_iswa::clear(bool data) {
    infllm->clear(data);
    swa->clear(data);
}

bool llama_kv_cache_infllm_iswa::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    // the InfLLM half decides what can be removed; the stock half follows only when it agreed
    // (llama_infllm_keep_prefix checks first that the SWA half still holds the window at p0)
    if (!infllm->seq_rm(seq_id, p0, p1)) {
        return false;
    }
    return swa->seq_rm(seq_id, p0, p1);
}

void llama_kv_cache_infllm_iswa::seq_cp(llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
    infllm->seq_cp(src, dst, p0, p1);   // warns: one sequence only; the stock half is left as it is
}

void llama_kv_cache_infllm_iswa::seq_keep(llama_seq_id seq_id) {
    infllm->seq_keep(seq_id);
    swa->seq_keep(seq_id);
}

void llama_kv_cache_infllm_iswa::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    infllm->seq_add(seq_id, p0, p1, shift);   // warns for a shift; both halves keep their positions
}

void llama_kv_cache_infllm_iswa::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    infllm->seq_div(seq_id, p0, p1, d);
}

llama_pos llama_kv_cache_infllm_iswa::seq_pos_min(llama_seq_id seq_id) const {
    // the sliding-window half forgets the start; the sequence is what the InfLLM half holds
    return infllm->seq_pos_min(seq_id);
}

llama_pos llama_kv_cache_infllm_iswa::seq_pos_max(llama_seq_id seq_id) const {
    return infllm->seq_pos_max(seq_id);
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_cache_infllm_iswa::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> ret = infllm->memory_breakdown();
    for (const auto & [buft, size] : swa->memory_breakdown()) {
        ret[buft] += size;
    }
    return ret;
}

void llama_kv_cache_infllm_iswa::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    infllm->state_write(io, seq_id, flags);
    swa->state_write(io, seq_id, flags);
}

void llama_kv_cache_infllm_iswa::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    try {
        infllm->state_read(io, seq_id, flags);
        swa->state_read(io, seq_id, flags);
    } catch (...) {
        clear(true);   // never half a state
        throw;
    }
}

//
// context
//

llama_kv_cache_infllm_iswa_context::llama_kv_cache_infllm_iswa_context(llama_memory_status status) :
    llama_kv_cache_iswa_context(status), status(status) {
}

llama_kv_cache_infllm_iswa_context::llama_kv_cache_infllm_iswa_context(llama_kv_cache_infllm_iswa * mem) :
    llama_kv_cache_iswa_context(mem->get_swa()),
    ctx_infllm(mem->get_infllm()->init_full()),
    status(llama_memory_status_combine(llama_kv_cache_iswa_context::get_status(), ctx_infllm->get_status())) {
}

llama_kv_cache_infllm_iswa_context::llama_kv_cache_infllm_iswa_context(
        llama_kv_cache_infllm_iswa * mem, slot_info_vec_t sinfos_base, slot_info_vec_t sinfos_swa,
        std::vector<llama_ubatch> ubatches, llama_memory_context_ptr ctx_infllm) :
    llama_kv_cache_iswa_context(mem->get_swa(), std::move(sinfos_base), std::move(sinfos_swa), std::move(ubatches)),
    ctx_infllm(std::move(ctx_infllm)),
    status(llama_memory_status_combine(llama_kv_cache_iswa_context::get_status(), this->ctx_infllm->get_status())) {
}

bool llama_kv_cache_infllm_iswa_context::next() {
    ctx_infllm->next();
    return llama_kv_cache_iswa_context::next();
}

bool llama_kv_cache_infllm_iswa_context::apply() {
    // the InfLLM half first: it plans the ubatch (and refuses what it cannot hold)
    if (!ctx_infllm->apply()) {
        return false;
    }
    return llama_kv_cache_iswa_context::apply();
}

//
// lookups
//

const llama_kv_cache_infllm_context * llama_infllm_context_of(const llama_memory_context_i * mctx) {
    if (const auto * m = dynamic_cast<const llama_kv_cache_infllm_context *>(mctx)) {
        return m;
    }
    if (const auto * m = dynamic_cast<const llama_kv_cache_infllm_iswa_context *>(mctx)) {
        return m->get_infllm();
    }
    return nullptr;
}

llama_kv_cache_infllm * llama_infllm_cache_of(llama_memory_i * mem) {
    if (auto * c = dynamic_cast<llama_kv_cache_infllm *>(mem)) {
        return c;
    }
    if (auto * c = dynamic_cast<llama_kv_cache_infllm_iswa *>(mem)) {
        return c->get_infllm();
    }
    return nullptr;
}

const llama_kv_cache_infllm * llama_infllm_cache_of(const llama_memory_i * mem) {
    return llama_infllm_cache_of(const_cast<llama_memory_i *>(mem));
}
