#include "llama-kv-cache-infllm.h"

#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
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
        const llama_model & model, const llama_infllm_params & params, const rope_params & rope,
        ggml_type type_k, ggml_type type_v, bool offload, uint32_t n_ctx, uint32_t n_ubatch) :
    params(params),
    hparams(model.hparams),
    n_ctx(n_ctx),
    n_ring(infllm_ring_size(params, n_ctx, n_ubatch)),
    n_blocks(infllm_n_blocks(params, n_ctx)),
    n_sel(std::min(params.topk, infllm_n_blocks(params, n_ctx))),
    n_mem_max(params.n_init + n_sel*params.block_size),
    n_ubatch(n_ubatch),
    rope(rope) {
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
        l.k_work   = ggml_new_tensor_2d(ctx, type_k, n_embd_k, n_mem_max + n_ring);
        l.v_work   = ggml_new_tensor_2d(ctx, type_v, n_embd_v, n_mem_max + n_ring);
        l.k_blk    = ggml_new_tensor_2d(ctx, type_k, n_embd_k, std::max(n_cells, 1u));
        l.v_blk    = ggml_new_tensor_2d(ctx, type_v, n_embd_v, std::max(n_cells, 1u));
        l.repr     = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd_k, n_blocks + 1);
        ggml_format_name(l.k_work,   "infllm_k_work_l%d", il);
        ggml_format_name(l.v_work,   "infllm_v_work_l%d", il);
        ggml_format_name(l.k_blk,    "infllm_k_blk_l%d",  il);
        ggml_format_name(l.v_blk,    "infllm_v_blk_l%d",  il);
        ggml_format_name(l.repr,     "infllm_repr_l%d",   il);

        ring_bytes  += ggml_nbytes(l.k_work) + ggml_nbytes(l.v_work);
        block_bytes += ggml_nbytes(l.k_blk)  + ggml_nbytes(l.v_blk);
        repr_bytes  += ggml_nbytes(l.repr);

        map_layer_ids[il] = layers.size();
        layers.push_back(l);
    }
    slots.resize(layers.size());
    for (auto & s : slots) {
        s.blk.assign(n_sel, -1);
        s.ref.assign(n_sel, 0);
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

uint32_t llama_kv_cache_infllm::n_selected(llama_pos ls) const {
    return std::min(n_sel, n_evicted(ls));
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
    for (auto & s : slots) {
        std::fill(s.blk.begin(), s.blk.end(), -1);
        s.sinks_ok = false;
    }
    GGML_UNUSED(data);
}

// RoPE as ggml's CPU kernel computes it (no YaRN, no frequency factors: both are refused)
template <typename T> static float to_f32(T x);
template <> float to_f32<float>(float x) { return x; }
template <> float to_f32<ggml_fp16_t>(ggml_fp16_t x) { return ggml_fp16_to_fp32(x); }
template <typename T> static T from_f32(float x);
template <> float from_f32<float>(float x) { return x; }
template <> ggml_fp16_t from_f32<ggml_fp16_t>(float x) { return ggml_fp32_to_fp16(x); }

template <typename T>
static void rotate_rows(const T * src, T * dst, int64_t n_rows, int64_t d, int n_rot, bool neox, const float * cs) {
    for (int64_t r = 0; r < n_rows; ++r) {
        const T * x = src + r*d;
        T * y = dst + r*d;
        for (int64_t i = n_rot; i < d; ++i) {
            y[i] = x[i];
        }
        for (int i0 = 0; i0 < n_rot; i0 += 2) {
            const int ic  = neox ? i0/2 : i0;
            const int off = neox ? n_rot/2 : 1;
            const float c = cs[i0], s = cs[i0 + 1];
            const float x0 = to_f32(x[ic]), x1 = to_f32(x[ic + off]);
            y[ic]       = from_f32<T>(x0*c - x1*s);
            y[ic + off] = from_f32<T>(x0*s + x1*c);
        }
    }
}

void llama_kv_cache_infllm::copy_rows(const layer & l, llama_pos pos, uint32_t n, uint32_t row, llama_pos ref) {
    const size_t kb = l.k_blk->nb[1]*n;
    const size_t vb = l.v_blk->nb[1]*n;
    const size_t k_src = (size_t) pos*l.k_blk->nb[1];
    const size_t v_src = (size_t) pos*l.v_blk->nb[1];
    const size_t k_dst = (size_t) row*l.k_work->nb[1];
    const size_t v_dst = (size_t) row*l.v_work->nb[1];
    staging.resize(std::max(kb, vb)*2);
    uint8_t * a = staging.data();
    uint8_t * b = staging.data() + std::max(kb, vb);

    ggml_backend_tensor_get(l.v_blk, a, v_src, vb);
    ggml_backend_tensor_set(l.v_work, a, v_dst, vb);

    ggml_backend_tensor_get(l.k_blk, a, k_src, kb);
    if (!params.absolute) {
        // raw keys (position 0) -> position ref
        const int64_t d = hparams.n_embd_head_k(l.il);
        const int64_t n_rows = (int64_t) n*(l.k_blk->ne[0]/d);
        rope_cache.resize(rope.n_rot);
        const float theta_scale = powf(rope.freq_base, -2.0f/rope.n_rot);
        float theta = (float) ref;
        for (int i0 = 0; i0 < rope.n_rot; i0 += 2) {
            const float t = rope.freq_scale*theta;
            rope_cache[i0]     = cosf(t)*rope.attn_factor;
            rope_cache[i0 + 1] = sinf(t)*rope.attn_factor;
            theta *= theta_scale;
        }
        if (l.k_blk->type == GGML_TYPE_F16) {
            rotate_rows((const ggml_fp16_t *) a, (ggml_fp16_t *) b, n_rows, d, rope.n_rot, rope.neox, rope_cache.data());
        } else {
            rotate_rows((const float *) a, (float *) b, n_rows, d, rope.n_rot, rope.neox, rope_cache.data());
        }
        std::swap(a, b);
    }
    ggml_backend_tensor_set(l.k_work, a, k_dst, kb);
    bytes_placed += kb + vb;
}

void llama_kv_cache_infllm::place_memory(int32_t il, const ggml_tensor * sel) {
    const auto & l = get_layer(il);
    auto & st = slots.at(map_layer_ids.at(il));
    const llama_pos ref = params.absolute ? 0 : memory_position(cur_ls);
    const uint32_t bs = params.block_size;

    if (params.n_init > 0 && (!st.sinks_ok || st.sinks_ref != ref)) {
        copy_rows(l, 0, params.n_init, n_sel*bs, ref);
        st.sinks_ok  = true;
        st.sinks_ref = ref;
    }
    if (sel == nullptr) {
        return;
    }

    const uint32_t n = (uint32_t) ggml_nelements(sel);
    GGML_ASSERT(n <= n_sel);
    std::vector<int32_t> ids(n);
    ggml_backend_tensor_get(sel, ids.data(), 0, n*sizeof(int32_t));

    // the usable slots are the last n (the attended rows end at the sinks)
    const uint32_t first = n_sel - n;
    std::vector<bool> keep(n_sel, false);
    std::vector<int32_t> missing;
    for (const int32_t b : ids) {
        GGML_ASSERT(b >= 0 && (uint32_t) b < n_blocks);
        bool hit = false;
        for (uint32_t j = first; j < n_sel; ++j) {
            if (!keep[j] && st.blk[j] == b && st.ref[j] == ref) {
                keep[j] = hit = true;
                break;
            }
        }
        if (hit) {
            ++blk_hits;
        } else {
            missing.push_back(b);
        }
    }
    uint32_t j = first;
    for (const int32_t b : missing) {
        while (keep[j]) {
            ++j;
        }
        copy_rows(l, (llama_pos) (params.n_init + (uint32_t) b*bs), bs, j*bs, ref);
        st.blk[j] = b;
        st.ref[j] = ref;
        keep[j]   = true;
        ++blk_misses;
    }
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
    s.hits         = blk_hits;
    s.misses       = blk_misses;
    s.bytes_placed = bytes_placed;
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
    cache->cur_ls   = cache->window_start(p0);
    cache->n_tokens = (uint32_t) (p0 + (llama_pos) ub.n_tokens);
    return true;
}

const llama_ubatch & llama_kv_cache_infllm_context::get_ubatch() const {
    static const llama_ubatch empty = {};
    return ubatches.empty() ? empty : ubatches[i_next];
}
