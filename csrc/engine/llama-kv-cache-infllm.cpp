#include "llama-kv-cache-infllm.h"

#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
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

static uint32_t infllm_n_sel(const llama_infllm_params & p, uint32_t n_ctx) {
    return std::min(p.topk, infllm_n_blocks(p, n_ctx));
}

static constexpr size_t INFLLM_TENSOR_PAD = 512;   // allocation padding allowance per tensor
// without a byte budget, the block cache holds this many times topk blocks per layer
static constexpr uint32_t INFLLM_DEFAULT_POOL_PER_TOPK = 4;

llama_kv_cache_infllm::footprint llama_kv_cache_infllm::device_footprint(
        const llama_model & model, const llama_infllm_params & p, ggml_type type_k, ggml_type type_v,
        uint32_t n_ctx, uint32_t n_ubatch) {
    const auto & hp = model.hparams;
    const uint32_t n_blocks  = infllm_n_blocks(p, n_ctx);
    const uint32_t n_mem_max = p.n_init + infllm_n_sel(p, n_ctx)*p.block_size;
    const uint32_t n_ring    = infllm_ring_size(p, n_ctx, n_ubatch);
    footprint f = {0, 0};
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        const size_t k_row = ggml_row_size(type_k, hp.n_embd_k_gqa(il));
        const size_t v_row = ggml_row_size(type_v, hp.n_embd_v_gqa(il));
        f.fixed += (k_row + v_row)*(n_mem_max + n_ring) + ggml_row_size(GGML_TYPE_F32, hp.n_embd_k_gqa(il))*std::max(n_blocks, 1u);
        f.fixed += 5*INFLLM_TENSOR_PAD;
        f.per_block += (k_row + v_row)*p.block_size;
    }
    return f;
}

llama_kv_cache_infllm::llama_kv_cache_infllm(
        const llama_model & model, const llama_infllm_params & params, const rope_params & rope,
        ggml_type type_k, ggml_type type_v, bool offload, uint32_t n_ctx, uint32_t n_ubatch) :
    params(params),
    hparams(model.hparams),
    n_ctx(n_ctx),
    n_ring(infllm_ring_size(params, n_ctx, n_ubatch)),
    n_blocks(infllm_n_blocks(params, n_ctx)),
    n_sel(infllm_n_sel(params, n_ctx)),
    n_mem_max(n_sel*params.block_size + params.n_init),
    n_ubatch(n_ubatch),
    rope(rope) {
    // the byte budget: everything but the block cache is fixed; the rest buys cache slots
    const footprint fp = device_footprint(model, params, type_k, type_v, n_ctx, n_ubatch);
    if (params.budget_bytes > 0) {
        if (params.budget_bytes < fp.fixed) {
            throw std::invalid_argument("kv_budget of " + std::to_string(params.budget_bytes) +
                " bytes is below the minimum of " + std::to_string(fp.fixed) + " bytes ('" +
                std::to_string((fp.fixed + (1u << 20) - 1) >> 20) + "MiB' is enough) that this model and config need on the device "
                "(local window, sinks, selected-block slots and representative keys for n_ctx = " +
                std::to_string(n_ctx) + ")");
        }
        n_pool = (uint32_t) std::min<size_t>(n_blocks - n_sel, (params.budget_bytes - fp.fixed)/fp.per_block);
    } else {
        // no budget: cache_blocks slots, by default INFLLM_DEFAULT_POOL_PER_TOPK x topk
        const uint32_t want = params.cache_blocks >= 0 ? (uint32_t) params.cache_blocks
                                                       : INFLLM_DEFAULT_POOL_PER_TOPK*params.topk;
        n_pool = std::min<uint32_t>(n_blocks - n_sel, want);
    }

    ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
    for (uint32_t il = 0; offload && il < hparams.n_layer(); ++il) {
        ggml_backend_buffer_type_t b = ggml_backend_dev_buffer_type(model.dev_layer(il));
        if (il > 0 && b != buft) {
            throw std::runtime_error("InfLLM cache: layers split over several devices are not supported");
        }
        buft = b;
    }

    {
        const char * env = std::getenv("PYLLAMA_INF_ATTN");
        one_query_kernel = buft == ggml_backend_cpu_buffer_type() && type_k == GGML_TYPE_F16 &&
                           type_v == GGML_TYPE_F16 && !(env && std::strcmp(env, "ggml") == 0);
    }

    ggml_init_params ip = {
        /*.mem_size   =*/ size_t(5u*hparams.n_layer()*ggml_tensor_overhead()),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        throw std::runtime_error("failed to create a ggml context for the InfLLM cache");
    }
    ctx_tensors.reset(ctx);

    std::vector<size_t> k_rows, v_rows;
    for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
        const uint32_t n_embd_k = hparams.n_embd_k_gqa(il);
        const uint32_t n_embd_v = hparams.n_embd_v_gqa(il);

        layer l = {};
        l.il     = il;
        l.k_work = ggml_new_tensor_2d(ctx, type_k, n_embd_k, n_mem_max + n_ring);
        l.v_work = ggml_new_tensor_2d(ctx, type_v, n_embd_v, n_mem_max + n_ring);
        l.repr   = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd_k, std::max(n_blocks, 1u));
        ggml_format_name(l.k_work, "infllm_k_work_l%d", il);
        ggml_format_name(l.v_work, "infllm_v_work_l%d", il);
        ggml_format_name(l.repr,   "infllm_repr_l%d",   il);
        if (n_pool > 0) {
            l.k_pool = ggml_new_tensor_2d(ctx, type_k, n_embd_k, n_pool*params.block_size);
            l.v_pool = ggml_new_tensor_2d(ctx, type_v, n_embd_v, n_pool*params.block_size);
            ggml_format_name(l.k_pool, "infllm_k_pool_l%d", il);
            ggml_format_name(l.v_pool, "infllm_v_pool_l%d", il);
            pool_bytes += ggml_nbytes(l.k_pool) + ggml_nbytes(l.v_pool);
        }
        work_bytes += ggml_nbytes(l.k_work) + ggml_nbytes(l.v_work);
        repr_bytes += ggml_nbytes(l.repr);
        k_rows.push_back(l.k_work->nb[1]);
        v_rows.push_back(l.v_work->nb[1]);

        map_layer_ids[il] = layers.size();
        layers.push_back(l);
    }
    k_row_bytes = k_rows.empty() ? 0 : k_rows[0];
    v_row_bytes = v_rows.empty() ? 0 : v_rows[0];

    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
    if (!buf) {
        throw std::runtime_error("failed to allocate the InfLLM cache buffer");
    }
    // unwritten cells are masked, but must not hold NaNs (0 * NaN poisons the attention)
    ggml_backend_buffer_clear(buf, 0);
    buf_device.reset(buf);

    // the host tier: the device's host buffer type (pinned memory) where it has one
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    ggml_backend_buffer_type_t host_buft = dev ? ggml_backend_dev_host_buffer_type(dev) : nullptr;
    if (host_buft == nullptr) {
        host_buft = ggml_backend_cpu_buffer_type();
    }
    store = std::make_unique<llama_infllm_host_store>(host_buft, k_rows, v_rows, params.n_init, params.block_size, 32u);
    if (params.host_budget > 0 && store->bytes_for(n_blocks) > params.host_budget) {
        throw std::invalid_argument("host_budget of " + std::to_string(params.host_budget) +
            " bytes is too small: the host block store needs up to " + std::to_string(store->bytes_for(n_blocks)) +
            " bytes for n_ctx = " + std::to_string(n_ctx));
    }
    xfer = std::make_unique<llama_infllm_transfer>(dev ? dev : ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));

    states.resize(layers.size());
    for (auto & st : states) {
        st.work.assign(n_sel, slot{});
        st.pool.assign(n_pool, slot{});
    }
    staging.resize((size_t) n_mem_max*k_row_bytes);

    LLAMA_LOG_INFO("%s: %10s InfLLM cache: %7.2f MiB (working sets %.2f, block cache %u slots %.2f, repr %.2f), host store %s via %s\n",
            __func__, ggml_backend_buffer_name(buf), ggml_backend_buffer_get_size(buf)/1024.0/1024.0,
            work_bytes/1024.0/1024.0, n_pool, pool_bytes/1024.0/1024.0, repr_bytes/1024.0/1024.0,
            ggml_backend_buft_name(host_buft), xfer->name());
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
    cur_ls   = 0;
    // representative keys are written whole when a block is evicted and unevicted blocks are
    // never selected, so neither they nor the (masked) stale cells need zeroing
    for (auto & st : states) {
        std::fill(st.work.begin(), st.work.end(), slot{});
        std::fill(st.pool.begin(), st.pool.end(), slot{});
        st.n_stored     = 0;
        st.sinks_stored = false;
        st.sinks_placed = false;
    }
    store->clear();
    GGML_UNUSED(data);
}

// RoPE as ggml's CPU kernel computes it (no YaRN, no frequency factors: both are refused):
// cos/sin of each rotated pair for position `pos`
static void rope_table(const llama_kv_cache_infllm::rope_params & rope, float pos, float * cs) {
    const float theta_scale = powf(rope.freq_base, -2.0f/rope.n_rot);
    float theta = pos;
    for (int i0 = 0; i0 < rope.n_rot; i0 += 2) {
        const float t = rope.freq_scale*theta;
        cs[i0]     = cosf(t)*rope.attn_factor;
        cs[i0 + 1] = sinf(t)*rope.attn_factor;
        theta *= theta_scale;
    }
}

// rotate n_heads head vectors of width d in place; cs: rope_table of the position
static void rotate_heads(float * x, int64_t n_heads, int64_t d, int n_rot, bool neox, const float * cs) {
    const int off = neox ? n_rot/2 : 1;
    for (int64_t h = 0; h < n_heads; ++h, x += d) {
        for (int i0 = 0; i0 < n_rot; i0 += 2) {
            const int ic = neox ? i0/2 : i0;
            const float c = cs[i0], s = cs[i0 + 1];
            const float x0 = x[ic], x1 = x[ic + off];
            x[ic]       = x0*c - x1*s;
            x[ic + off] = x0*s + x1*c;
        }
    }
}

// rotate K rows (each row: the KV heads of one token) from src to dst (may be equal), by one
// table per row or one for all; f16 rows are converted in bulk and rotated in f32
static void rotate_rows(ggml_type type, const void * src, void * dst, int64_t n_rows, int64_t row_elems, int64_t d,
                        const llama_kv_cache_infllm::rope_params & rope, const float * cs, bool table_per_row,
                        std::vector<float> & scratch) {
    const int64_t n = n_rows*row_elems;
    float * x = nullptr;
    if (type == GGML_TYPE_F16) {
        scratch.resize(n);
        x = scratch.data();
        ggml_fp16_to_fp32_row((const ggml_fp16_t *) src, x, n);
    } else {
        x = (float *) dst;
        if (src != dst) {
            std::memcpy(dst, src, n*sizeof(float));
        }
    }
    for (int64_t r = 0; r < n_rows; ++r) {
        rotate_heads(x + r*row_elems, row_elems/d, d, rope.n_rot, rope.neox, cs + (table_per_row ? r*rope.n_rot : 0));
    }
    if (type == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(x, (ggml_fp16_t *) dst, n);
    }
}

void llama_kv_cache_infllm::evict(const layer & l, layer_state & st, uint32_t n_ev) {
    const uint32_t bs = params.block_size;
    const int64_t row_k = l.k_work->ne[0];
    const int64_t d = hparams.n_embd_head_k(l.il);

    // queue reads of positions [pos, pos + n) from the ring (cell = pos % n_ring)
    auto read_ring = [&](llama_pos pos, uint32_t n, uint8_t * k_dst, uint8_t * v_dst) {
        for (uint32_t i = 0; i < n; ) {
            const uint32_t cell = (uint32_t) ((pos + (llama_pos) i) % n_ring);
            const uint32_t run  = std::min(n - i, n_ring - cell);
            xfer->get(l.k_work, k_dst + (size_t) i*k_row_bytes, (size_t) (n_mem_max + cell)*k_row_bytes, (size_t) run*k_row_bytes);
            xfer->get(l.v_work, v_dst + (size_t) i*v_row_bytes, (size_t) (n_mem_max + cell)*v_row_bytes, (size_t) run*v_row_bytes);
            i += run;
        }
    };
    // keys as the ring holds them (true positions) -> position 0, in place
    auto unrotate = [&](llama_pos pos, uint32_t n, uint8_t * k) {
        rope_cache.resize((size_t) n*rope.n_rot);
        for (uint32_t i = 0; i < n; ++i) {
            rope_table(rope, -(float) (pos + (llama_pos) i), rope_cache.data() + (size_t) i*rope.n_rot);
        }
        rotate_rows(l.k_work->type, k, k, n, row_k, d, rope, rope_cache.data(), true, rot_scratch);
    };

    if (params.n_init > 0 && !st.sinks_stored) {
        store->reserve(0);
        read_ring(0, params.n_init, store->k(l.il, -1), store->v(l.il, -1));
        xfer->wait();
        if (!params.absolute) {
            unrotate(0, params.n_init, store->k(l.il, -1));
        }
        st.sinks_stored = true;
    }
    if (n_ev <= st.n_stored) {
        return;
    }
    store->reserve(n_ev);
    const uint32_t b0 = st.n_stored;
    for (uint32_t b = b0; b < n_ev; ++b) {
        read_ring((llama_pos) (params.n_init + b*bs), bs, store->k(l.il, (int32_t) b), store->v(l.il, (int32_t) b));
    }
    xfer->wait();

    // representative keys: the sum of the block's keys at position 0
    repr_row.assign((size_t) (n_ev - b0)*row_k, 0.0f);
    std::vector<uint8_t> raw;
    for (uint32_t b = b0; b < n_ev; ++b) {
        uint8_t * k = store->k(l.il, (int32_t) b);
        if (params.absolute) {
            // stored as the ring holds them; un-rotate a copy for the sum
            raw.assign(k, k + (size_t) bs*k_row_bytes);
            k = raw.data();
        }
        unrotate((llama_pos) (params.n_init + b*bs), bs, k);
        const float * x = (const float *) k;
        if (l.k_work->type == GGML_TYPE_F16) {
            rot_scratch.resize((size_t) bs*row_k);
            ggml_fp16_to_fp32_row((const ggml_fp16_t *) k, rot_scratch.data(), (int64_t) bs*row_k);
            x = rot_scratch.data();
        }
        float * sum = repr_row.data() + (size_t) (b - b0)*row_k;
        for (uint32_t i = 0; i < bs; ++i) {
            for (int64_t j = 0; j < row_k; ++j) {
                sum[j] += x[(size_t) i*row_k + j];
            }
        }
    }
    xfer->set(l.repr, repr_row.data(), (size_t) b0*l.repr->nb[1], (size_t) (n_ev - b0)*l.repr->nb[1]);
    xfer->wait();
    st.n_stored = n_ev;
}

void llama_kv_cache_infllm::fetch(const layer & l, int32_t blk, uint32_t row, llama_pos ref) {
    const uint32_t n = blk < 0 ? params.n_init : params.block_size;
    const uint8_t * k = store->k(l.il, blk);
    if (!params.absolute) {
        // raw keys (position 0) -> position ref, staged at the row's place until the wait
        uint8_t * dst = staging.data() + (size_t) row*k_row_bytes;
        rope_cache.resize(rope.n_rot);
        rope_table(rope, (float) ref, rope_cache.data());
        rotate_rows(l.k_work->type, k, dst, n, l.k_work->ne[0], hparams.n_embd_head_k(l.il), rope, rope_cache.data(), false,
                    rot_scratch);
        k = dst;
    }
    xfer->set(l.k_work, k, (size_t) row*k_row_bytes, (size_t) n*k_row_bytes);
    xfer->set(l.v_work, store->v(l.il, blk), (size_t) row*v_row_bytes, (size_t) n*v_row_bytes);
}

void llama_kv_cache_infllm::copy_block(const layer & l, uint32_t work_slot, uint32_t pool_slot, bool to_pool) {
    const int64_t bs = params.block_size;
    ggml_init_params ip = { 4*ggml_tensor_overhead(), nullptr, true };
    ggml_context_ptr ctx(ggml_init(ip));
    auto view = [&](ggml_tensor * t, int64_t first_row) {
        ggml_tensor * v = ggml_view_2d(ctx.get(), t, t->ne[0], bs, t->nb[1], (size_t) first_row*t->nb[1]);
        ggml_backend_view_init(v);   // buffer + data of the view
        return v;
    };
    ggml_tensor * kw = view(l.k_work, (int64_t) work_slot*bs);
    ggml_tensor * vw = view(l.v_work, (int64_t) work_slot*bs);
    ggml_tensor * kp = view(l.k_pool, (int64_t) pool_slot*bs);
    ggml_tensor * vp = view(l.v_pool, (int64_t) pool_slot*bs);
    ggml_backend_tensor_copy(to_pool ? kw : kp, to_pool ? kp : kw);
    ggml_backend_tensor_copy(to_pool ? vw : vp, to_pool ? vp : vw);
}

bool llama_kv_cache_infllm::needs_eviction(llama_pos ls) const {
    if (ls <= 0 || states.empty()) {
        return false;
    }
    const layer_state & st = states[0];   // all layers move together, one ubatch at a time
    return n_evicted(ls) > st.n_stored || (params.n_init > 0 && !st.sinks_stored);
}

namespace {
// adds the scope's wall time to a counter
struct scope_timer {
    double & acc;
    const int64_t t0 = ggml_time_us();
    ~scope_timer() { acc += 1e-6*(double) (ggml_time_us() - t0); }
};
}

void llama_kv_cache_infllm::on_evict(int32_t il) {
    scope_timer t{host_work_s};
    evict(get_layer(il), states.at(map_layer_ids.at(il)), n_evicted(cur_ls));
}

void llama_kv_cache_infllm::on_sync(int32_t il, const ggml_tensor * sel) {
    const layer & l = get_layer(il);
    layer_state & st = states.at(map_layer_ids.at(il));
    const uint32_t bs = params.block_size;
    const llama_pos ref = params.absolute ? 0 : memory_position(cur_ls);
    const int64_t stamp = ++n_sync;
    scope_timer timer{host_work_s};

    // normally done at the evict node already (the selection needed the representative keys)
    evict(l, st, n_evicted(cur_ls));

    if (params.n_init > 0 && (!st.sinks_placed || st.sinks_ref != ref)) {
        fetch(l, -1, n_sel*bs, ref);
        st.sinks_placed = true;
        st.sinks_ref    = ref;
    }

    if (sel != nullptr) {
        const uint32_t n = (uint32_t) ggml_nelements(sel);
        GGML_ASSERT(n <= n_sel);
        std::vector<int32_t> ids(n);
        ggml_backend_tensor_get(sel, ids.data(), 0, n*sizeof(int32_t));

        // the slots in use are the last n (the attended rows end at the sinks)
        const uint32_t first = n_sel - n;
        std::vector<bool> keep(n_sel, false);
        std::vector<int32_t> missing;
        for (const int32_t b : ids) {
            GGML_ASSERT(b >= 0 && (uint32_t) b < st.n_stored);
            bool hit = false;
            for (uint32_t j = first; j < n_sel && !hit; ++j) {
                if (!keep[j] && st.work[j].blk == b && st.work[j].ref == ref) {
                    keep[j] = hit = true;
                    st.work[j].used = stamp;
                }
            }
            if (hit) {
                ++blk_hits;
            } else {
                missing.push_back(b);
            }
        }
        auto pool_find = [&](int32_t b) -> int32_t {
            for (uint32_t p = 0; p < n_pool; ++p) {
                if (st.pool[p].blk == b && st.pool[p].ref == ref) {
                    return (int32_t) p;
                }
            }
            return -1;
        };
        uint32_t j = first;
        for (const int32_t b : missing) {
            while (keep[j]) {
                ++j;
            }
            const int32_t from = pool_find(b);
            // the slot's block (when still valid) moves to the device block cache: unless it
            // is there already, into an empty or stale slot, else the least recently used
            slot & w = st.work[j];
            if (n_pool > 0 && w.blk >= 0 && w.ref == ref && pool_find(w.blk) < 0) {
                int32_t to = -1;
                for (uint32_t p = 0; p < n_pool; ++p) {
                    if ((int32_t) p == from) {
                        continue;
                    }
                    const slot & c = st.pool[p];
                    if (c.blk < 0 || c.ref != ref) {
                        to = (int32_t) p;
                        break;
                    }
                    if (to < 0 || c.used < st.pool[to].used) {
                        to = (int32_t) p;
                    }
                }
                if (to >= 0) {
                    copy_block(l, j, (uint32_t) to, true);
                    st.pool[to] = w;
                }
            }
            if (from >= 0) {
                copy_block(l, j, (uint32_t) from, false);
                st.pool[from].used = stamp;
                ++blk_hits;
                ++pool_hits;
            } else {
                fetch(l, b, j*bs, ref);
                ++blk_misses;
            }
            w = slot{b, ref, stamp};
            keep[j] = true;
        }
    }
    xfer->wait();
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
    ret[ggml_backend_buffer_get_type(buf_device.get())] = ggml_backend_buffer_get_size(buf_device.get());
    return ret;
}

void llama_kv_cache_infllm::state_write(llama_io_write_i &, llama_seq_id, llama_state_seq_flags) const {
    throw std::runtime_error("saving the state of an InfLLM cache is not supported");
}

void llama_kv_cache_infllm::state_read(llama_io_read_i &, llama_seq_id, llama_state_seq_flags) {
    throw std::runtime_error("loading a state into an InfLLM cache is not supported");
}

void llama_kv_cache_infllm::get_stats(llama_infllm_stats & s) const {
    const llama_pos ref = params.absolute ? 0 : memory_position(cur_ls);
    int64_t resident = 0;
    for (const auto & st : states) {
        for (const auto * v : {&st.work, &st.pool}) {
            for (const slot & x : *v) {
                resident += x.blk >= 0 && x.ref == ref;
            }
        }
    }
    s.n_tokens        = n_tokens;
    s.n_blocks        = states.empty() ? 0 : states[0].n_stored;
    s.n_blocks_max    = n_blocks;
    s.selections      = selections;
    s.n_ring          = n_ring;
    s.n_pool          = n_pool;
    s.work_bytes      = work_bytes;
    s.pool_bytes      = pool_bytes;
    s.repr_bytes      = repr_bytes;
    s.device_bytes    = ggml_backend_buffer_get_size(buf_device.get());
    s.budget_bytes    = params.budget_bytes;
    s.host_bytes      = store->bytes();
    s.blocks_resident = resident;
    s.hits            = blk_hits;
    s.pool_hits       = pool_hits;
    s.misses          = blk_misses;
    s.bytes_h2d       = xfer->bytes_h2d;
    s.bytes_d2h       = xfer->bytes_d2h;
    s.transfer_wait_s = xfer->wait_s;
    s.host_work_s     = host_work_s;
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
