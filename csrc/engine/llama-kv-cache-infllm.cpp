#include "llama-kv-cache-infllm.h"

#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <stdexcept>

//
// llama_kv_cache_infllm
//

static uint32_t infllm_ring_size(const llama_infllm_params & p, uint32_t n_ctx, uint32_t n_ubatch) {
    // the window of a ubatch spans [ls, p_last]: at most n_local + max(n_init, block_size) + n_ubatch positions
    const uint32_t need = p.n_local + std::max(p.n_init, p.block_size) + n_ubatch;
    return std::min(n_ctx, need);
}

static uint32_t infllm_n_blocks(const llama_infllm_params & p, uint32_t n_ctx) {
    return n_ctx > p.n_init ? (n_ctx - p.n_init + p.block_size - 1) / p.block_size : 0;
}

llama_kv_cache_infllm::llama_kv_cache_infllm(
        const llama_model & model, const llama_infllm_params & params,
        ggml_type type_k, ggml_type type_v, bool offload, uint32_t n_ctx, uint32_t n_ubatch) :
    params(params),
    hparams(model.hparams),
    n_ctx(n_ctx),
    n_ring(infllm_ring_size(params, n_ctx, n_ubatch)),
    n_blocks(infllm_n_blocks(params, n_ctx)),
    n_sel(std::min(params.topk, infllm_n_blocks(params, n_ctx))),
    n_ubatch(n_ubatch) {
    const uint32_t n_cells = params.n_init + n_blocks*params.block_size;

    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_map;
    auto ctx_for_buft = [&](ggml_backend_buffer_type_t buft) -> ggml_context * {
        auto it = ctx_map.find(buft);
        if (it != ctx_map.end()) {
            return it->second;
        }
        ggml_init_params ip = {
            /*.mem_size   =*/ size_t(6u*hparams.n_layer()*ggml_tensor_overhead()),
            /*.mem_buffer =*/ nullptr,
            /*.no_alloc   =*/ true,
        };
        ggml_context * ctx = ggml_init(ip);
        if (!ctx) {
            throw std::runtime_error("failed to create a ggml context for the InfLLM cache");
        }
        ctxs_bufs.emplace_back(ggml_context_ptr(ctx), nullptr);
        ctx_map[buft] = ctx;
        return ctx;
    };

    for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
        ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
        if (offload) {
            buft = ggml_backend_dev_buffer_type(model.dev_layer(il));
        }
        ggml_context * ctx = ctx_for_buft(buft);

        const uint32_t n_embd_k = hparams.n_embd_k_gqa(il);
        const uint32_t n_embd_v = hparams.n_embd_v_gqa(il);

        layer l;
        l.il       = il;
        l.k_ring   = ggml_new_tensor_2d(ctx, type_k, n_embd_k, n_ring);
        l.v_ring   = ggml_new_tensor_2d(ctx, type_v, n_embd_v, n_ring);
        l.v_ring_t = ggml_new_tensor_2d(ctx, type_v, n_ring, n_embd_v);
        l.k_blk    = ggml_new_tensor_2d(ctx, type_k, n_embd_k, std::max(n_cells, 1u));
        l.v_blk    = ggml_new_tensor_2d(ctx, type_v, n_embd_v, std::max(n_cells, 1u));
        l.repr     = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd_k, n_blocks + 1);
        ggml_format_name(l.k_ring,   "infllm_k_ring_l%d", il);
        ggml_format_name(l.v_ring,   "infllm_v_ring_l%d", il);
        ggml_format_name(l.v_ring_t, "infllm_v_ring_t_l%d", il);
        ggml_format_name(l.k_blk,    "infllm_k_blk_l%d",  il);
        ggml_format_name(l.v_blk,    "infllm_v_blk_l%d",  il);
        ggml_format_name(l.repr,     "infllm_repr_l%d",   il);

        ring_bytes  += ggml_nbytes(l.k_ring) + ggml_nbytes(l.v_ring) + ggml_nbytes(l.v_ring_t);
        block_bytes += ggml_nbytes(l.k_blk)  + ggml_nbytes(l.v_blk);
        repr_bytes  += ggml_nbytes(l.repr);

        map_layer_ids[il] = layers.size();
        layers.push_back(l);
    }

    for (auto & [buft, ctx] : ctx_map) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
        if (!buf) {
            throw std::runtime_error("failed to allocate the InfLLM cache buffer");
        }
        // unwritten cells are masked, but must not hold NaNs (0 * NaN poisons the attention)
        ggml_backend_buffer_clear(buf, 0);
        for (auto & cb : ctxs_bufs) {
            if (cb.first.get() == ctx) {
                cb.second.reset(buf);
            }
        }
        LLAMA_LOG_INFO("%s: %10s InfLLM cache: %7.2f MiB\n", __func__, ggml_backend_buffer_name(buf),
                ggml_backend_buffer_get_size(buf)/1024.0/1024.0);
    }
    LLAMA_LOG_INFO("%s: n_ctx = %u, ring = %u cells, blocks = %u x %u, select %u, n_init = %u, n_local = %u, positions = %s\n",
            __func__, n_ctx, n_ring, n_blocks, params.block_size, n_sel, params.n_init, params.n_local,
            params.absolute ? "absolute" : "infllm");
}

llama_pos llama_kv_cache_infllm::window_start(llama_pos p0) const {
    const llama_pos base = p0 - (llama_pos) params.n_local;
    const llama_pos n_init = (llama_pos) params.n_init;
    if (base <= n_init) {
        return 0;
    }
    const llama_pos bs = (llama_pos) params.block_size;
    return n_init + ((base - n_init)/bs)*bs;
}

uint32_t llama_kv_cache_infllm::n_evicted(llama_pos ls) const {
    if (ls < (llama_pos) params.n_init || ls == 0) {
        return 0;
    }
    return std::min<uint32_t>(n_blocks, (uint32_t) (ls - params.n_init)/params.block_size);
}

uint32_t llama_kv_cache_infllm::n_ring_used(llama_pos p_end) const {
    // like the stock cache, attend to the written cells rounded up to 256 until the ring is full
    return p_end >= (llama_pos) n_ring ? n_ring : std::min<uint32_t>(n_ring, GGML_PAD((uint32_t) p_end, 256u));
}

const llama_kv_cache_infllm::layer & llama_kv_cache_infllm::get_layer(int32_t il) const {
    return layers.at(map_layer_ids.at(il));
}

llama_memory_context_ptr llama_kv_cache_infllm::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    GGML_UNUSED(embd_all);

    balloc.split_reset();
    std::vector<llama_ubatch> ubatches;
    llama_pos next = (llama_pos) n_tokens;
    while (true) {
        llama_ubatch ubatch = balloc.split_simple(n_ubatch);
        if (ubatch.n_tokens == 0) {
            break;
        }
        for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
            if (ubatch.n_seq_id[i] != 1 || ubatch.seq_id[i][0] != 0) {
                LLAMA_LOG_ERROR("%s: the InfLLM cache holds a single sequence (id 0)\n", __func__);
                return std::make_unique<llama_kv_cache_infllm_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
            if (ubatch.pos[i] != next++) {
                LLAMA_LOG_ERROR("%s: the InfLLM cache only appends: expected position %d, got %d\n",
                        __func__, next - 1, ubatch.pos[i]);
                return std::make_unique<llama_kv_cache_infllm_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
        }
        ubatches.push_back(std::move(ubatch));
    }
    if (balloc.get_n_used() < balloc.get_n_tokens() || next > (llama_pos) n_ctx) {
        return std::make_unique<llama_kv_cache_infllm_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }
    return std::make_unique<llama_kv_cache_infllm_context>(this, std::move(ubatches));
}

llama_memory_context_ptr llama_kv_cache_infllm::init_full() {
    return std::make_unique<llama_kv_cache_infllm_context>(this);
}

llama_memory_context_ptr llama_kv_cache_infllm::init_update(llama_context * lctx, bool optimize) {
    GGML_UNUSED(lctx);
    GGML_UNUSED(optimize);
    return std::make_unique<llama_kv_cache_infllm_context>(LLAMA_MEMORY_STATUS_NO_UPDATE);
}

void llama_kv_cache_infllm::clear(bool data) {
    n_tokens = 0;
    // the representative keys are running sums and must restart from zero; stale ring and
    // block cells are finite and masked, so the (much larger) rest is left as it is
    for (const auto & l : layers) {
        ggml_backend_tensor_memset(l.repr, 0, 0, ggml_nbytes(l.repr));
    }
    GGML_UNUSED(data);
}

bool llama_kv_cache_infllm::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (seq_id > 0) {
        return false;
    }
    if (p0 <= 0 && (p1 < 0 || p1 >= (llama_pos) n_tokens)) {
        clear(true);
        return true;
    }
    if (p0 >= (llama_pos) n_tokens) {
        return true;   // nothing stored there
    }
    // removing part of the sequence would leave stale blocks and representative keys
    return false;
}

void llama_kv_cache_infllm::seq_cp(llama_seq_id, llama_seq_id, llama_pos, llama_pos) {
    LLAMA_LOG_WARN("%s: not supported by the InfLLM cache (single sequence)\n", __func__);
}

void llama_kv_cache_infllm::seq_keep(llama_seq_id seq_id) {
    if (seq_id != 0) {
        clear(true);
    }
}

void llama_kv_cache_infllm::seq_add(llama_seq_id, llama_pos, llama_pos, llama_pos shift) {
    if (shift != 0) {
        LLAMA_LOG_WARN("%s: position shifts are not supported by the InfLLM cache\n", __func__);
    }
}

void llama_kv_cache_infllm::seq_div(llama_seq_id, llama_pos, llama_pos, int d) {
    if (d != 1) {
        LLAMA_LOG_WARN("%s: position division is not supported by the InfLLM cache\n", __func__);
    }
}

llama_pos llama_kv_cache_infllm::seq_pos_min(llama_seq_id seq_id) const {
    return seq_id == 0 && n_tokens > 0 ? 0 : -1;
}

llama_pos llama_kv_cache_infllm::seq_pos_max(llama_seq_id seq_id) const {
    return seq_id == 0 ? (llama_pos) n_tokens - 1 : -1;
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_cache_infllm::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> ret;
    for (const auto & [ctx, buf] : ctxs_bufs) {
        if (buf) {
            ret[ggml_backend_buffer_get_type(buf.get())] += ggml_backend_buffer_get_size(buf.get());
        }
    }
    return ret;
}

void llama_kv_cache_infllm::state_write(llama_io_write_i &, llama_seq_id, llama_state_seq_flags) const {
    throw std::runtime_error("saving the state of an InfLLM cache is not supported");
}

void llama_kv_cache_infllm::state_read(llama_io_read_i &, llama_seq_id, llama_state_seq_flags) {
    throw std::runtime_error("loading a state into an InfLLM cache is not supported");
}

void llama_kv_cache_infllm::get_stats(llama_infllm_stats & s) const {
    s.n_tokens     = n_tokens;
    s.n_blocks     = n_evicted(window_start((llama_pos) n_tokens));
    s.n_blocks_max = n_blocks;
    s.selections   = selections;
    s.n_ring       = n_ring;
    s.ring_bytes   = ring_bytes;
    s.block_bytes  = block_bytes;
    s.repr_bytes   = repr_bytes;
    s.host_bytes   = 0;
}

//
// llama_kv_cache_infllm_context
//

llama_kv_cache_infllm_context::llama_kv_cache_infllm_context(llama_memory_status status) : status(status) {
}

llama_kv_cache_infllm_context::llama_kv_cache_infllm_context(llama_kv_cache_infllm * cache) :
    status(LLAMA_MEMORY_STATUS_SUCCESS), cache(cache) {
}

llama_kv_cache_infllm_context::llama_kv_cache_infllm_context(llama_kv_cache_infllm * cache, std::vector<llama_ubatch> ubatches) :
    status(ubatches.empty() ? LLAMA_MEMORY_STATUS_NO_UPDATE : LLAMA_MEMORY_STATUS_SUCCESS),
    cache(cache), ubatches(std::move(ubatches)) {
}

bool llama_kv_cache_infllm_context::next() {
    return ++i_next < ubatches.size();
}

bool llama_kv_cache_infllm_context::apply() {
    if (ubatches.empty()) {
        return true;   // reservation
    }
    const llama_ubatch & ub = ubatches[i_next];
    const llama_pos p0 = ub.pos[0];
    if (cache->n_evicted(cache->window_start(p0)) > 0 && cache->n_sel > 0) {
        cache->selections += cache->hparams.n_layer();
    }
    cache->n_tokens = (uint32_t) (p0 + (llama_pos) ub.n_tokens);
    return true;
}

const llama_ubatch & llama_kv_cache_infllm_context::get_ubatch() const {
    static const llama_ubatch empty = {};
    return ubatches.empty() ? empty : ubatches[i_next];
}
